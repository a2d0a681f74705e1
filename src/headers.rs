//! Header rules for a forwarding proxy: hop-by-hop removal and `X-Forwarded-*`.
//!
//! Only headers are touched here; the request target is rewritten by [`crate::upstream`].

use std::net::IpAddr;

use http::header::{HeaderName, HeaderValue, CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Uri};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Connection-specific headers (RFC 9110 §7.6.1), the non-standard `Keep-Alive` and
/// `Proxy-Connection` that clients still send, and `Proxy-Authorization`, which is meant for the
/// proxy itself (RFC 9110 §11.7.2). They describe one hop and must not be forwarded.
static HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    TE,
    TRANSFER_ENCODING,
    UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("proxy-authorization"),
];

/// Whether `name` (any case) is one of the [`HOP_BY_HOP`] headers; for heads that are not parsed
/// into a [`HeaderMap`].
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.as_str().eq_ignore_ascii_case(name))
}

/// Whether a request asks to switch protocols (RFC 9110 §7.8), e.g. to WebSocket.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers like [`remove_hop_by_hop`], except that a protocol switch keeps
/// `Upgrade` and `Connection: upgrade`: the proxy passes the switch through to the next hop.
pub fn remove_hop_by_hop_keeping_upgrade(headers: &mut HeaderMap) {
    let upgrade = headers.get(UPGRADE).cloned();
    remove_hop_by_hop(headers);
    if let Some(protocol) = upgrade {
        headers.insert(UPGRADE, protocol);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Headers that naming in `Connection` does not remove.
static PROTECTED: [HeaderName; 5] =
    [HOST, http::header::CONTENT_LENGTH, X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST];

/// Removes hop-by-hop headers, including every header the `Connection` header names
/// (RFC 9110 §7.6.1: "a proxy MUST ... remove any header fields it lists").
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names instead of a lookup per name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            // A client cannot make end-to-end fields disappear by naming them in Connection:
            // Host and the message framing must reach the upstream whatever it says.
            .filter(|name| !PROTECTED.contains(name))
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Prepares a client request's headers for the upstream: hop-by-hop removed (a protocol switch
/// keeps its `Upgrade`), `Host` kept (or
/// taken from the HTTP/2 `:authority`), `X-Forwarded-For` appended, `X-Forwarded-Proto` and
/// `X-Forwarded-Host` set.
/// A client's address as an `X-Forwarded-For` entry, rendered once per connection rather than
/// once per request.
#[derive(Debug, Clone)]
pub struct ClientIp(HeaderValue);

impl ClientIp {
    pub fn new(ip: IpAddr) -> Self {
        ClientIp(HeaderValue::from_str(&ip.to_string()).expect("an IP address is a valid header value"))
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().expect("an IP address is ASCII")
    }
}

pub fn prepare_request(headers: &mut HeaderMap, uri: &Uri, client: &ClientIp, proto: &'static str) {
    if is_upgrade(headers) {
        remove_hop_by_hop_keeping_upgrade(headers);
    } else {
        remove_hop_by_hop(headers);
    }

    if !headers.contains_key(HOST) {
        // HTTP/2 carries the host in the URI; the HTTP/1.1 upstream needs it as a header.
        if let Some(value) = uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            headers.insert(HOST, value);
        }
    }
    if let Some(host) = headers.get(HOST).cloned() {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }

    let forwarded_for = match joined(headers, &X_FORWARDED_FOR) {
        Some(previous) => HeaderValue::from_str(&format!("{previous}, {}", client.as_str()))
            .expect("an address appended to valid values is valid"),
        None => client.0.clone(),
    };
    headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
}

/// All values of a repeated header joined with ", " (RFC 9110 §5.3), if present.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    Some(values.fold(first.to_owned(), |acc, v| acc + ", " + v))
}

/// The size of a request head as the client sent it, near enough: target plus each header line.
pub fn head_size(uri: &Uri, headers: &HeaderMap) -> usize {
    headers.iter().fold(uri.path_and_query().map_or(1, |pq| pq.as_str().len()), |sum, (name, value)| {
        sum + name.as_str().len() + value.len() + 4
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        headers
    }

    #[test]
    fn connection_named_and_standard_hop_by_hop_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn an_upgrade_keeps_only_its_own_hop_by_hop_headers() {
        let mut h = map(&[
            ("connection", "Upgrade, x-secret"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("keep-alive", "5"),
        ]);
        assert!(is_upgrade(&h));
        remove_hop_by_hop_keeping_upgrade(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(
            (h["upgrade"].to_str().unwrap(), h["connection"].to_str().unwrap()),
            ("websocket", "upgrade")
        );
        assert!(!is_upgrade(&map(&[("upgrade", "websocket")])), "Upgrade without Connection: upgrade");
    }

    #[test]
    fn connection_cannot_remove_host_or_framing() {
        let mut h = map(&[
            ("connection", "host, content-length, x-gone"),
            ("host", "a.example"),
            ("content-length", "3"),
            ("x-gone", "1"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h["host"], "a.example");
        assert_eq!(h["content-length"], "3");
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn forwarded_for_is_appended_to_every_previous_value() {
        let mut h =
            map(&[("host", "app.example"), ("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")]);
        prepare_request(&mut h, &Uri::from_static("/x"), &ClientIp::new("10.0.0.9".parse().unwrap()), "http");
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.9");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["host"], "app.example");
    }

    #[test]
    fn http2_authority_becomes_host() {
        let mut h = HeaderMap::new();
        prepare_request(
            &mut h,
            &Uri::from_static("http://app.example:8080/x"),
            &ClientIp::new("::1".parse().unwrap()),
            "http",
        );
        assert_eq!(h["host"], "app.example:8080");
        assert_eq!(h["x-forwarded-for"], "::1");
    }
}
