//! TLS termination: HTTPS and h2 over TLS with a certificate made by the test, a certificate
//! swapped and reloaded under an open connection, and https upstreams.

mod support;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use support::{admin_call, ConfigBuilder, Pool, ProxyBuilder, ProxyHandle, Upstream, UpstreamSettings};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const TOKEN: &str = "tls-test-token";

/// A fresh self-signed certificate for `localhost`: (certificate PEM, key PEM, certificate DER).
fn certificate() -> (String, String, CertificateDer<'static>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    (made.cert.pem(), made.signing_key.serialize_pem(), made.cert.der().clone())
}

fn install(dir: &Path, cert: &(String, String, CertificateDer<'static>)) {
    std::fs::write(dir.join("cert.pem"), &cert.0).unwrap();
    std::fs::write(dir.join("key.pem"), &cert.1).unwrap();
}

/// A client trusting `roots`, offering `alpn`.
fn connector(roots: &[&CertificateDer<'static>], alpn: &[&[u8]]) -> TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add((*root).clone()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every connection makes a full handshake, so each one shows the certificate served now.
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(proxy: &ProxyHandle, connector: &TlsConnector) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap()
}

fn peer_certificate(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

/// A proxy serving TLS with the certificate [`install`]ed in `dir`, loaded from
/// `dir/rollout.yaml` so a reload reads the certificate files again.
async fn start(dir: &Path, upstreams: (std::net::SocketAddr, std::net::SocketAddr)) -> ProxyHandle {
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let config = ConfigBuilder::one_each(upstreams.0, upstreams.1)
        .tls(&dir.join("cert.pem"), &dir.join("key.pem"))
        .admin_token_file(&dir.join("token"));
    std::fs::write(dir.join("rollout.yaml"), config.render()).unwrap();
    ProxyBuilder::from_file(&dir.join("rollout.yaml")).spawn().await
}

async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
) -> (StatusCode, support::Echo) {
    let req = Request::get(path).header("host", "localhost").body(Full::default()).unwrap();
    let response = sender.send_request(req).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn https_and_h2_are_served_and_a_reloaded_certificate_spares_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let first = certificate();
    install(dir.path(), &first);
    let upstreams = (Upstream::new("v1-a").spawn().await, Upstream::new("v2-a").spawn().await);
    let proxy = start(dir.path(), upstreams).await;

    // HTTPS over HTTP/1.1, on a connection kept open across the reload below.
    let second = certificate();
    let trusting_both = connector(&[&first.2, &second.2], &[b"http/1.1"]);
    let stream = tls_connect(&proxy, &trusting_both).await;
    assert_eq!(peer_certificate(&stream), first.2);
    let (mut old_conn, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let (status, echo) = get_on(&mut old_conn, "/api/v2/studies/1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo.upstream, "v2-a");
    assert_eq!(echo.headers["x-forwarded-proto"], ["https"]);

    // HTTP/2 chosen by ALPN.
    let h2 = tls_connect(&proxy, &connector(&[&first.2], &[b"h2", b"http/1.1"])).await;
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2_sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2)).await.unwrap();
    tokio::spawn(connection);
    let req = Request::get("https://localhost/api/studies/5").body(Full::<Bytes>::default()).unwrap();
    let response = h2_sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-rollout-pool"], "v1");

    // Swap the certificate files and reload.
    install(dir.path(), &second);
    let reply = admin_call("POST", &proxy.admin_url("/reload"), Some(TOKEN), None, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let (status, _) = get_on(&mut old_conn, "/api/v2/studies/2").await;
    assert_eq!(status, StatusCode::OK, "the open connection survived the reload");
    let fresh = tls_connect(&proxy, &trusting_both).await;
    assert_eq!(peer_certificate(&fresh), second.2, "new connections get the new certificate");

    // A broken key refuses the reload and keeps serving the second certificate.
    std::fs::write(
        dir.path().join("key.pem"),
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let reply = admin_call("POST", &proxy.admin_url("/reload"), Some(TOKEN), None, None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.json()["error"].as_str().unwrap().contains("certificate reload failed"),
        "{:?}",
        reply.body
    );
    let still = tls_connect(&proxy, &trusting_both).await;
    assert_eq!(peer_certificate(&still), second.2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_https_upstream_is_reached_and_verified_with_the_configured_ca() {
    // The "upstream" is a second rollout-proxy with TLS in front of a plain stub: a real TLS
    // server whose certificate only the CA file vouches for.
    let backend_dir = tempfile::tempdir().unwrap();
    let backend_cert = certificate();
    install(backend_dir.path(), &backend_cert);
    let stubs = (Upstream::new("inner-v1").spawn().await, Upstream::new("inner-v2").spawn().await);
    let backend = start(backend_dir.path(), stubs).await;

    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &backend_cert.0).unwrap();
    let https_upstream = format!("https://localhost:{}", backend.addr.port());
    let v2 = Upstream::new("v2-a").spawn().await;
    let config = ConfigBuilder::new().upstream(Pool::V1, "v1-a", &https_upstream, 1).v2("v2-a", v2, 1);
    let trusting = config.clone().upstream_settings(UpstreamSettings {
        ca_file: Some(ca.path().to_owned()),
        ..UpstreamSettings::default()
    });
    let front = ProxyBuilder::new(&trusting).spawn().await;
    let reply = support::get(&front.url("/api/studies/3")).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.echo().upstream, "inner-v1");

    // Without the CA the upstream's certificate is refused: a connect failure, not a response.
    let strict = ProxyBuilder::new(&config).spawn().await;
    let reply = support::get(&strict.url("/api/studies/3")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.header("x-rollout-error"), Some("upstream_connect"));
    for proxy in [front, strict, backend] {
        proxy.shutdown().await;
    }
}

/// `admin.tls`: the admin API answers over HTTPS only, `ctl` reaches it with `--ca-file`, and a
/// reload reads the admin certificate again too.
#[tokio::test]
async fn the_admin_api_over_tls_is_reached_by_ctl_and_its_certificate_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let first = certificate();
    std::fs::write(dir.path().join("admin-cert.pem"), &first.0).unwrap();
    std::fs::write(dir.path().join("admin-key.pem"), &first.1).unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let (v1, v2) = (Upstream::new("v1-a").spawn().await, Upstream::new("v2-a").spawn().await);
    let config = ConfigBuilder::one_each(v1, v2)
        .admin_tls(&dir.path().join("admin-cert.pem"), &dir.path().join("admin-key.pem"))
        .admin_token_file(&dir.path().join("token"));
    std::fs::write(dir.path().join("rollout.yaml"), config.render()).unwrap();
    let proxy = ProxyBuilder::from_file(&dir.path().join("rollout.yaml")).spawn().await;
    let https = format!("https://localhost:{}", proxy.admin_addr.port());
    let ctl = |admin: String, ca: &str, args: &[&str]| {
        let mut command = support::binary();
        command
            .args(["ctl", "--admin", &admin, "--ca-file", ca, "--token-file"])
            .arg(dir.path().join("token"));
        command.args(args).env_remove("ROLLOUT_ADMIN_URL");
        async move {
            let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
            (
                out.status.code(),
                String::from_utf8(out.stdout).unwrap(),
                String::from_utf8(out.stderr).unwrap(),
            )
        }
    };
    std::fs::write(dir.path().join("ca-first.pem"), &first.0).unwrap();
    let ca_first = dir.path().join("ca-first.pem").to_str().unwrap().to_owned();
    let (code, out, err) = ctl(https.clone(), &ca_first, &["legacy-percent", "60"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("100.0% -> 60.0%"), "{out}");
    // Plain HTTP gets nothing from it.
    let (code, _, err) = ctl(format!("http://{}", proxy.admin_addr), &ca_first, &["status"]).await;
    assert_eq!(code, Some(1), "{err}");

    // A new certificate, reloaded: ctl must now trust the new one.
    let second = certificate();
    std::fs::write(dir.path().join("admin-cert.pem"), &second.0).unwrap();
    std::fs::write(dir.path().join("admin-key.pem"), &second.1).unwrap();
    let (code, _, err) = ctl(https.clone(), &ca_first, &["reload"]).await;
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = ctl(https.clone(), &ca_first, &["status"]).await;
    assert_eq!(code, Some(1), "the old certificate is no longer served: {err}");
    std::fs::write(dir.path().join("ca-second.pem"), &second.0).unwrap();
    let (code, out, err) = ctl(https, dir.path().join("ca-second.pem").to_str().unwrap(), &["status"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("60.0% (admin"), "{out}");
    proxy.shutdown().await;
}
