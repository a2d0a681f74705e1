//! The header and framing rules of the request path, shared by both codecs.
//!
//! Which fields go to the next hop, which `Host` a request has, and whether an upstream
//! response's framing can be trusted are decided here once; the HTTP/1.1 fast path
//! ([`crate::h1`]) calls these functions on the bytes it parsed in place, the hyper path calls them
//! on a [`HeaderMap`]. A codec only parses and writes bytes. The request target is made
//! origin-form by [`crate::upstream`]; what the proxy answers when a rule refuses a message is
//! [`crate::proxy`]'s business.

use std::net::IpAddr;

use http::header::{
    HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Uri};

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

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

/// Whether `name` (any case) is one of the hop-by-hop headers.
fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.as_str().eq_ignore_ascii_case(name))
}

/// The `X-Forwarded-*` fields the proxy sets itself; a client's own values are not passed on as
/// they came.
fn is_forwarded_field(name: &str) -> bool {
    [&X_FORWARDED_FOR, &X_FORWARDED_PROTO, &X_FORWARDED_HOST]
        .iter()
        .any(|h| h.as_str().eq_ignore_ascii_case(name))
}

/// Fields that naming in `Connection` does not remove: a client cannot make `Host`, the message
/// framing or the forwarding fields disappear.
fn is_protected(name: &[u8]) -> bool {
    [&HOST, &CONTENT_LENGTH, &X_FORWARDED_FOR, &X_FORWARDED_PROTO, &X_FORWARDED_HOST]
        .iter()
        .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
}

/// The tokens of one `Connection` field value (RFC 9110 §7.6.1), trimmed, empty ones skipped.
pub(crate) fn connection_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

/// Whether one of the `connection` field values names `name`, which makes it a hop-by-hop field
/// of this message (protected fields excepted). Every token counts, however many there are.
fn is_named_in_connection<'a>(connection: impl IntoIterator<Item = &'a [u8]>, name: &str) -> bool {
    connection.into_iter().flat_map(connection_tokens).any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
        && !is_protected(name.as_bytes())
}

/// A field value as text, the way [`http::HeaderValue::to_str`] reads it: visible ASCII and tabs
/// only, so both paths see the same values (a session key from a `Cookie` line, say).
pub(crate) fn text_value(value: &[u8]) -> Option<&str> {
    if value.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)) {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// Whether a client request's field `name` stays behind, whatever `Connection` names: hop-by-hop
/// fields, the `X-Forwarded-*` the proxy sets itself, and unless `allow_underscores`, any name
/// with an underscore. Backends that map `_` to `-` (CGI, WSGI) would read `Content_Length` or
/// `X_Forwarded_For` as the real thing next to the proxy's own (NGINX's `underscores_in_headers
/// off` drops them the same way).
pub(crate) fn is_dropped_request_field(name: &str, allow_underscores: bool) -> bool {
    is_hop_by_hop(name) || is_forwarded_field(name) || (!allow_underscores && name.contains('_'))
}

/// Why a request has no usable host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HostError {
    #[error("the request has no Host")]
    Missing,
    #[error("the request has more than one Host")]
    Repeated,
    #[error("the request's host is not a valid authority")]
    Invalid,
}

/// The `Host` fields of a request, as a codec meets them while it reads the fields.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HostFields<'a> {
    first: Option<&'a [u8]>,
    count: usize,
}

impl<'a> HostFields<'a> {
    /// Notes one `Host` field.
    pub(crate) fn add(&mut self, value: &'a [u8]) {
        self.first.get_or_insert(value);
        self.count += 1;
    }

    pub(crate) fn of(values: impl Iterator<Item = &'a [u8]>) -> Self {
        values.fold(HostFields::default(), |mut fields, value| {
            fields.add(value);
            fields
        })
    }
}

/// The host of a request (RFC 9112 §3.2): the target's authority when it has one (absolute-form,
/// or HTTP/2's `:authority`), which replaces any `Host` field (RFC 9112 §3.2.2); otherwise
/// exactly one `Host` field. Either way it must be a valid `host[:port]` authority.
pub(crate) fn request_host<'a>(
    target_authority: Option<&'a [u8]>,
    fields: HostFields<'a>,
) -> Result<&'a [u8], HostError> {
    let host = match (target_authority, fields) {
        (Some(authority), _) => authority,
        (None, HostFields { first: Some(host), count: 1 }) => host,
        (None, HostFields { first: None, .. }) => return Err(HostError::Missing),
        (None, _) => return Err(HostError::Repeated),
    };
    if is_valid_authority(host) {
        Ok(host)
    } else {
        Err(HostError::Invalid)
    }
}

/// `host [ ":" port ]` of RFC 3986 §3.2.2–3.2.3, without user information: a registered name
/// (unreserved, percent-encoded and sub-delimiter characters), an IPv4 address (a registered name
/// by these characters) or a bracketed IPv6 literal, then at most five port digits.
fn is_valid_authority(value: &[u8]) -> bool {
    let (host, port) = match value.iter().rposition(|&b| b == b':') {
        Some(i) if !value[i..].contains(&b']') => (&value[..i], &value[i + 1..]),
        _ => (value, &b""[..]),
    };
    if port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
        return false;
    }
    if let Some(literal) = host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")) {
        return !literal.is_empty()
            && literal.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    }
    !host.is_empty() && is_reg_name(host)
}

fn is_reg_name(host: &[u8]) -> bool {
    let mut i = 0;
    while i < host.len() {
        match host[i] {
            b'%' => {
                if !host.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 2;
            }
            b if b.is_ascii_alphanumeric() => {}
            b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b','
            | b';' | b'=' => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

/// Whether a response status can be relayed: three digits from 100 to 599 (RFC 9110 §15).
pub(crate) fn is_valid_status(status: u16) -> bool {
    (100..=599).contains(&status)
}

/// How an upstream response's body is delimited, from its header fields (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ResponseFraming {
    /// `Transfer-Encoding: chunked`; any `Content-Length` next to it is void and dropped.
    pub chunked: bool,
    /// The `Content-Length`, when there is one and no `Transfer-Encoding`.
    pub length: Option<u64>,
    /// More than one `Content-Length` field, all with the same value: merged into one.
    pub repeated_length: bool,
}

/// Why an upstream response cannot be relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidResponse {
    #[error("status {0} is not between 100 and 599")]
    Status(u16),
    #[error("Transfer-Encoding is not exactly `chunked`")]
    TransferEncoding,
    #[error("Content-Length is not one decimal number")]
    ContentLength,
}

impl ResponseFraming {
    /// Takes one field of an upstream response into account, in order; [`ResponseFraming::finish`]
    /// when all are in. Strict, so that what the proxy relays can only be read one way
    /// downstream: `Transfer-Encoding` must be the single coding `chunked` (the proxy decodes
    /// nothing else), every `Content-Length` must be the same run of digits (RFC 9110 §8.6 lets
    /// identical duplicates be merged).
    pub(crate) fn read_field(&mut self, name: &str, value: &[u8]) -> Result<(), InvalidResponse> {
        if name.eq_ignore_ascii_case("transfer-encoding") {
            let mut codings = value.split(|&b| b == b',').map(<[u8]>::trim_ascii);
            let single = codings.next().is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
                && codings.next().is_none();
            if self.chunked || !single {
                return Err(InvalidResponse::TransferEncoding);
            }
            self.chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(value).ok_or(InvalidResponse::ContentLength)?;
            if self.length.is_some_and(|m| m != n) {
                return Err(InvalidResponse::ContentLength);
            }
            self.repeated_length |= self.length.is_some();
            self.length = Some(n);
        }
        Ok(())
    }

    /// The framing once every field is read: with `Transfer-Encoding`, no length.
    pub(crate) fn finish(mut self) -> Self {
        if self.chunked {
            self.length = None;
            self.repeated_length = false;
        }
        self
    }
}

/// [`ResponseFraming::read_field`] over all of a response's fields.
pub(crate) fn response_framing<'a>(
    fields: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Result<ResponseFraming, InvalidResponse> {
    let mut framing = ResponseFraming::default();
    for (name, value) in fields {
        framing.read_field(name, value)?;
    }
    Ok(framing.finish())
}

/// A `Content-Length` value: decimal digits only (RFC 9110 §8.6), no sign, no list, at most 15 of
/// them.
pub(crate) fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 15 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// Whether an upstream response's field `name` stays behind: hop-by-hop fields (the body is
/// re-framed for the client), a `Content-Length` void next to `Transfer-Encoding`
/// (RFC 9112 §6.3), and fields its `Connection` names. `x-rollout-pool` is the caller's.
pub(crate) fn is_dropped_response_field<'a>(
    name: &str,
    framing: &ResponseFraming,
    connection: impl IntoIterator<Item = &'a [u8]>,
) -> bool {
    is_hop_by_hop(name)
        || (framing.chunked && name.eq_ignore_ascii_case("content-length"))
        || is_named_in_connection(connection, name)
}

/// Whether a request asks to switch protocols (RFC 9110 §7.8), e.g. to WebSocket.
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| connection_tokens(v.as_bytes()))
            .any(|token| token.eq_ignore_ascii_case(b"upgrade"))
}

/// Removes hop-by-hop headers like [`remove_hop_by_hop`], except that a protocol switch keeps
/// `Upgrade` and `Connection: upgrade`: the proxy passes the switch through to the next hop.
fn remove_hop_by_hop_keeping_upgrade(headers: &mut HeaderMap) {
    let upgrade = headers.get(UPGRADE).cloned();
    remove_hop_by_hop(headers);
    if let Some(protocol) = upgrade {
        headers.insert(UPGRADE, protocol);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Removes hop-by-hop headers, including every header the `Connection` header names
/// (RFC 9110 §7.6.1: "a proxy MUST ... remove any header fields it lists").
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names instead of a lookup per name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| connection_tokens(v.as_bytes()))
            .filter(|token| !is_protected(token))
            .filter_map(|token| HeaderName::from_bytes(token).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// A client's address as an `X-Forwarded-For` entry, rendered once per connection rather than
/// once per request.
#[derive(Debug, Clone)]
pub struct ClientIp(HeaderValue);

impl ClientIp {
    pub fn new(ip: IpAddr) -> Self {
        ClientIp(HeaderValue::from_str(&ip.to_string()).expect("an IP address is a valid header value"))
    }

    pub(crate) fn as_str(&self) -> &str {
        self.0.to_str().expect("an IP address is ASCII")
    }
}

/// Prepares a client request's headers for the upstream (the hyper path's twin of
/// [`crate::h1::write_request`]): hop-by-hop removed (a protocol switch keeps its `Upgrade`),
/// fields [`is_dropped_request_field`] refuses removed, `Host` set to `host` (from
/// [`request_host`]), `X-Forwarded-For` appended, `X-Forwarded-Proto` and `X-Forwarded-Host` set.
pub fn prepare_request(
    headers: &mut HeaderMap,
    host: HeaderValue,
    client: &ClientIp,
    proto: &'static str,
    allow_underscores: bool,
) {
    if is_upgrade(headers) {
        remove_hop_by_hop_keeping_upgrade(headers);
    } else {
        remove_hop_by_hop(headers);
    }
    if !allow_underscores && headers.keys().any(|name| name.as_str().contains('_')) {
        let named: Vec<HeaderName> =
            headers.keys().filter(|name| name.as_str().contains('_')).cloned().collect();
        for name in named {
            headers.remove(name);
        }
    }

    headers.insert(HOST, host.clone());
    headers.insert(X_FORWARDED_HOST.clone(), host);
    let forwarded_for = match joined(headers, &X_FORWARDED_FOR) {
        Some(mut previous) => {
            previous.extend_from_slice(b", ");
            previous.extend_from_slice(client.as_str().as_bytes());
            HeaderValue::from_bytes(&previous).expect("an address appended to valid values is valid")
        }
        None => client.0.clone(),
    };
    headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
}

/// Checks an upstream response's framing and prepares its headers for the client (the hyper
/// path's twin of [`crate::h1::rewrite_response`]): hop-by-hop and `Connection`-named fields
/// removed (a protocol switch keeps its `Upgrade`), a void `Content-Length` dropped and repeated
/// identical ones merged.
pub(crate) fn prepare_response(status: u16, headers: &mut HeaderMap) -> Result<(), InvalidResponse> {
    if !is_valid_status(status) {
        return Err(InvalidResponse::Status(status));
    }
    let framing = response_framing(headers.iter().map(|(name, value)| (name.as_str(), value.as_bytes())))?;
    if framing.chunked {
        headers.remove(CONTENT_LENGTH);
    } else if let (true, Some(length)) = (framing.repeated_length, framing.length) {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    if status == 101 {
        remove_hop_by_hop_keeping_upgrade(headers);
    } else {
        remove_hop_by_hop(headers);
    }
    Ok(())
}

/// All values of a repeated header joined with ", " (RFC 9110 §5.3), if present, byte for byte
/// as the fast path joins them.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<Vec<u8>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?.as_bytes().to_vec();
    Some(values.fold(first, |mut acc, v| {
        acc.extend_from_slice(b", ");
        acc.extend_from_slice(v.as_bytes());
        acc
    }))
}

/// The size of a request head as the client sent it, near enough: target plus each header line.
pub(crate) fn head_size(uri: &Uri, headers: &HeaderMap) -> usize {
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

    fn ip(text: &str) -> ClientIp {
        ClientIp::new(text.parse().unwrap())
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
    fn every_connection_token_counts_however_many() {
        let tokens = "a, b, c, d, e, f, g, h, x-ninth";
        assert!(is_named_in_connection([tokens.as_bytes()], "X-Ninth"));
        assert!(!is_named_in_connection([tokens.as_bytes()], "x-tenth"));
        assert!(!is_named_in_connection([&b"content-length, host"[..]], "content-length"));
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
        prepare_request(&mut h, HeaderValue::from_static("app.example"), &ip("10.0.0.9"), "http", false);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.9");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["host"], "app.example");
    }

    #[test]
    fn underscore_names_are_dropped_unless_allowed() {
        let pairs = [("host", "a"), ("x_forwarded_for", "6.6.6.6"), ("content_length", "9"), ("x-ok", "1")];
        let mut h = map(&pairs);
        prepare_request(&mut h, HeaderValue::from_static("a"), &ip("10.0.0.9"), "http", false);
        assert!(!h.contains_key("x_forwarded_for") && !h.contains_key("content_length"), "{h:?}");
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        let mut h = map(&pairs);
        prepare_request(&mut h, HeaderValue::from_static("a"), &ip("10.0.0.9"), "http", true);
        assert_eq!(h["content_length"], "9");
        assert!(is_dropped_request_field("Transfer_Encoding", false));
        assert!(!is_dropped_request_field("Transfer_Encoding", true));
        assert!(is_dropped_request_field("X-Forwarded-Proto", true));
    }

    #[test]
    fn the_host_is_exactly_one_valid_authority() {
        let host =
            |fields: &[&'static str]| request_host(None, HostFields::of(fields.iter().map(|f| f.as_bytes())));
        assert_eq!(host(&["app.example:8080"]), Ok(&b"app.example:8080"[..]));
        assert_eq!(host(&["[::1]:443"]), Ok(&b"[::1]:443"[..]));
        assert_eq!(host(&["10.0.0.1"]), Ok(&b"10.0.0.1"[..]));
        assert_eq!(host(&[]), Err(HostError::Missing));
        assert_eq!(host(&["a", "a"]), Err(HostError::Repeated));
        for bad in ["", "a b", "evil.example/x?y@z", "user@a", "a:80:80", "a:123456", "[::1", "a%zz", "a:x"] {
            assert_eq!(host(&[bad]), Err(HostError::Invalid), "{bad:?}");
        }
        // The target's authority wins over (and replaces) any Host field.
        let two = HostFields::of([&b"a"[..], b"c"].into_iter());
        assert_eq!(request_host(Some(b"b.example"), two), Ok(&b"b.example"[..]));
        assert_eq!(request_host(Some(b"b c"), HostFields::default()), Err(HostError::Invalid));
    }

    #[test]
    fn response_framing_is_strict() {
        let framing = |fields: &[(&'static str, &'static str)]| {
            response_framing(fields.iter().map(|(n, v)| (*n, v.as_bytes())))
        };
        assert_eq!(framing(&[("Content-Length", "5")]).unwrap().length, Some(5));
        let merged = framing(&[("Content-Length", "5"), ("content-length", "5")]).unwrap();
        assert!(merged.repeated_length && merged.length == Some(5));
        let chunked = framing(&[("Transfer-Encoding", "chunked"), ("Content-Length", "3")]).unwrap();
        assert!(chunked.chunked && chunked.length.is_none());
        for bad in [
            &[("Content-Length", "5"), ("Content-Length", "6")][..],
            &[("Content-Length", "5, 5")],
            &[("Content-Length", "+5")],
            &[("Content-Length", "")],
            &[("Transfer-Encoding", "gzip")],
            &[("Transfer-Encoding", "gzip, chunked")],
            &[("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
            &[("Transfer-Encoding", "chunked, chunked")],
            &[("Transfer-Encoding", "")],
        ] {
            assert!(framing(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_response_with_transfer_encoding_loses_its_content_length() {
        let mut h = map(&[("transfer-encoding", "chunked"), ("content-length", "3"), ("x-kept", "1")]);
        prepare_response(200, &mut h).unwrap();
        assert_eq!(h.len(), 1, "{h:?}");
        let mut h = map(&[("content-length", "3"), ("content-length", "3")]);
        prepare_response(200, &mut h).unwrap();
        assert_eq!(h.get_all("content-length").iter().count(), 1);
        assert_eq!(prepare_response(999, &mut HeaderMap::new()), Err(InvalidResponse::Status(999)));
    }
}
