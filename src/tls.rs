//! TLS with rustls: termination for clients (certificates reloadable without dropping a
//! connection) and the client side for `https://` upstreams.
//!
//! PEM files are parsed with rustls-pki-types. A reload reads both files again and swaps the
//! certificate new handshakes get; connections already established keep theirs. When a reload
//! happens is [`crate::control`]'s decision; accepting connections is [`crate::listener`]'s.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::ring as provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid PEM", file.display())]
    Pem {
        file: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{} holds no certificate", file.display())]
    NoCertificate { file: PathBuf },
    #[error("the private key in {} cannot be used", file.display())]
    Key {
        file: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the certificate in {} does not match the key in {}", cert.display(), key.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

fn read(file: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file).map_err(|source| TlsError::Read { file: file.to_owned(), source })
}

fn certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(file)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { file: file.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { file: file.to_owned() });
    }
    Ok(certs)
}

/// The served certificate, swappable at run time.
#[derive(Debug)]
pub(crate) struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

impl CertStore {
    pub(crate) fn load(cert: &Path, key: &Path) -> Result<Arc<CertStore>, TlsError> {
        let current = ArcSwap::from_pointee(Self::read(cert, key)?);
        Ok(Arc::new(CertStore { cert: cert.to_owned(), key: key.to_owned(), current }))
    }

    /// Reads both files again; on any problem the served certificate stays as it was.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        self.current.store(Arc::new(Self::read(&self.cert, &self.key)?));
        Ok(())
    }

    fn read(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
        let chain = certificates(cert)?;
        let der = PrivateKeyDer::from_pem_slice(&read(key)?)
            .map_err(|source| TlsError::Pem { file: key.to_owned(), source })?;
        let signing = provider::sign::any_supported_type(&der)
            .map_err(|source| TlsError::Key { file: key.to_owned(), source })?;
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|source| TlsError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        })?;
        Ok(certified)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Server settings: the certificate from `store`, ALPN `h2` then `http/1.1`.
pub(crate) fn server_config(store: Arc<CertStore>) -> Arc<rustls::ServerConfig> {
    serving(store, &[b"h2", b"http/1.1"])
}

/// Server settings for the admin listener, which speaks HTTP/1.1 only.
pub(crate) fn admin_server_config(store: Arc<CertStore>) -> Arc<rustls::ServerConfig> {
    serving(store, &[b"http/1.1"])
}

fn serving(store: Arc<CertStore>, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A hyper client for `http://` and `https://` URLs over HTTP/1.1, with [`client_config`]'s
/// roots (and `ca_file`): what the ramp's gates and `ctl` use.
pub(crate) type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

pub(crate) fn https_client(ca_file: Option<&Path>) -> Result<HttpsClient, TlsError> {
    let mut tls = (*client_config(ca_file)?).clone();
    // The connector sets ALPN itself, from the HTTP versions it is enabled for.
    tls.alpn_protocols.clear();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector))
}

/// Client settings for `https://` upstreams: the Mozilla roots, plus the CAs in `ca_file`.
pub(crate) fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(file) = ca_file {
        for cert in certificates(file)? {
            roots.add(cert).map_err(|source| TlsError::Key { file: file.to_owned(), source })?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
