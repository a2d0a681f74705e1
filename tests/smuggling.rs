//! Request smuggling and response splitting, black box: raw bytes into the proxy, strictly
//! parsed bytes out of it (the parser is the test's own, `support::raw`).
//!
//! - Client -> proxy: a corpus of malformed or ambiguous requests, each followed by a canary on
//!   the same connection. No case may desynchronise the connection (every answer is the proxy's
//!   own error or the upstream's `seen <method> <target>` for a request the client sent, in
//!   order), no request hidden in a body may reach the upstream, the upstream must never see
//!   what its strict parser refuses, and where the rules (R1–R5) require a refusal it is a 400
//!   (431 for an oversized head) followed by a close. Every case runs on the fast path (first
//!   request of a connection) and on the hyper path (after a request that hands the connection
//!   over), and both must end in the same outcome class.
//! - Upstream -> proxy: a scripted upstream answers with malformed or ambiguous responses (and,
//!   for splitting cases, a second response later on the same socket). The injected response
//!   never reaches a client, invalid framing or status is a 502 `upstream_invalid` (R6), and
//!   the next request on the client connection gets its own answer.
//!
//! The cases are generated here from tables. Each names the published technique it follows:
//! defparam/smuggler's Transfer-Encoding mutations, PortSwigger's http-request-smuggler
//! permutations, HTTP Garden findings, the "funky chunks" chunk-parsing techniques, and hyper's
//! advisories (RUSTSEC/GHSA). `R1`..`R6` in comments are the request-path rules decided for
//! issue 13 (framing, Host, underscores, hop-by-hop fields, fragments, upstream responses).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use support::raw::{self, Answer, RawConn, Recorded, Seen};
use support::{eventually, ConfigBuilder, Ejection, Pool, ProxyBuilder, UpstreamSettings};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Cases in flight at once.
const CONCURRENCY: usize = 16;
/// How long a case waits for its answers.
const READ_TIMEOUT: Duration = Duration::from_millis(1000);

/// The request a case hides in a body; `####` is the run's number, fixed width so lengths
/// computed when the tables are built stay right.
const SMUG: &[u8] = b"GET /smuggled-#### HTTP/1.1\r\nHost: a\r\n\r\n";
const CANARY: &[u8] = b"GET /canary-#### HTTP/1.1\r\nHost: a\r\n\r\n";
/// Names a header in `Connection`, which hands the connection from the fast path to hyper.
const PRIME: &[u8] = b"GET /prime-#### HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-h\r\nX-H: 1\r\n\r\n";

/// `template` with every `####` replaced by `id` in four digits.
fn fill(template: &[u8], id: usize) -> Vec<u8> {
    let number = format!("{id:04}");
    let mut out = Vec::with_capacity(template.len());
    let mut i = 0;
    while i < template.len() {
        if template[i..].starts_with(b"####") {
            out.extend_from_slice(number.as_bytes());
            i += 4;
        } else {
            out.push(template[i]);
            i += 1;
        }
    }
    out
}

fn text(template: &str, id: usize) -> String {
    String::from_utf8(fill(template.as_bytes(), id)).unwrap()
}

/// `METHOD /case-#### HTTP/1.1`, `Host: a`, the field lines (each without its CRLF), the empty
/// line, the body.
fn req(method: &str, fields: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} /case-#### HTTP/1.1\r\nHost: a\r\n").into_bytes();
    for field in fields {
        out.extend_from_slice(field);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Lines (request line included) each ended by CRLF, the empty line, the body.
fn lines(lines: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in lines {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn cl(n: usize) -> Vec<u8> {
    format!("Content-Length: {n}").into_bytes()
}

/// One chunk: size line, data, CRLF.
fn chunk(data: &[u8]) -> Vec<u8> {
    [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat()
}

/// What the rules require of a client case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Forwarded once; the connection stays usable (the canary is answered).
    Keep,
    /// Forwarded once; the proxy closes the connection after the answer (TE + CL, R1).
    Close,
    /// Forwarded once; what follows on the connection is only checked for desync.
    Forward,
    /// The proxy answers this status itself (`x-rollout-error`), forwards nothing, and closes.
    Refuse(u16),
    /// Never forwarded; the proxy answers with an error of its own or closes.
    Reject,
    /// The rules leave the choice (forward or refuse); only the absence of desync is checked.
    Either,
}

struct Case {
    name: String,
    /// The published technique the case follows.
    source: &'static str,
    method: &'static str,
    payload: Vec<u8>,
    expect: Expect,
    /// The body the upstream must receive when the case is forwarded.
    body: Option<Vec<u8>>,
    /// The `Host` the upstream must receive.
    host: &'static str,
    /// The target the upstream must receive (template).
    target: &'static str,
}

impl Case {
    fn new(
        name: impl Into<String>,
        source: &'static str,
        method: &'static str,
        payload: Vec<u8>,
        expect: Expect,
    ) -> Case {
        Case {
            name: name.into(),
            source,
            method,
            payload,
            expect,
            body: None,
            host: "a",
            target: "/case-####",
        }
    }

    fn body(mut self, body: &[u8]) -> Case {
        self.body = Some(body.to_vec());
        self
    }

    fn host(mut self, host: &'static str) -> Case {
        self.host = host;
        self
    }

    fn target(mut self, target: &'static str) -> Case {
        self.target = target;
        self
    }
}

/// How the rules read a Transfer-Encoding mutation.
#[derive(Clone, Copy, Debug)]
enum Te {
    /// A valid `Transfer-Encoding: chunked` (case, OWS and the like are not errors).
    Chunked,
    /// Must be refused with 400: a final coding other than `chunked`, whitespace before the
    /// colon, obs-fold, a control byte, a bad field name.
    Invalid,
    /// Not a Transfer-Encoding field at all (or one the proxy drops, R3): framing by the rest.
    Absent,
    /// The rules leave it open (duplicated `chunked`, unknown codings before `chunked`,
    /// tolerated bare LF, NUL replaced by SP...).
    Open,
}

/// Transfer-Encoding mutations: (name, source, field line(s) without the final CRLF, class).
const TE_MUTATIONS: &[(&str, &str, &[u8], Te)] = &[
    ("vanilla", "smuggler/http-request-smuggler vanilla", b"Transfer-Encoding: chunked", Te::Chunked),
    ("nospace", "http-request-smuggler nospace1", b"Transfer-Encoding:chunked", Te::Chunked),
    ("tabprefix1", "smuggler tabprefix1", b"Transfer-Encoding:\tchunked", Te::Chunked),
    ("valueprefix1", "smuggler valueprefix1", b"Transfer-Encoding:  chunked", Te::Chunked),
    ("tabsuffix", "smuggler tabsuffix", b"Transfer-Encoding: chunked\t", Te::Chunked),
    ("spacesuffix", "SMUGGLEtest whitespace obfuscation", b"Transfer-Encoding: chunked ", Te::Chunked),
    ("mixed-ws", "SMUGGLEtest whitespace obfuscation", b"Transfer-Encoding:\t \tchunked \t", Te::Chunked),
    ("sarcasm", "smuggler sarcasm", b"TrAnSFer-EnCODinG: cHuNkeD", Te::Chunked),
    ("yelling", "smuggler yelling", b"TRANSFER-ENCODING: CHUNKED", Te::Chunked),
    ("lowercase", "SMUGGLEtest case obfuscation", b"transfer-encoding: chunked", Te::Chunked),
    (
        "connection-names-te",
        "Kettle, hop-by-hop header abuse (Connection: Transfer-Encoding)",
        b"Connection: Transfer-Encoding\r\nTransfer-Encoding: chunked",
        Te::Chunked,
    ),
    ("space1", "smuggler space1", b"Transfer-Encoding : chunked", Te::Invalid),
    ("tabprefix2", "smuggler tabprefix2", b"Transfer-Encoding\t:\tchunked", Te::Invalid),
    (
        "nameprefix1",
        "smuggler nameprefix1 (obs-fold after Host)",
        b" Transfer-Encoding: chunked",
        Te::Invalid,
    ),
    ("nameprefix-tab", "SMUGGLEtest tab obfuscation", b"\tTransfer-Encoding: chunked", Te::Invalid),
    ("linewrapped1", "smuggler linewrapped1", b"Transfer-Encoding:\n chunked", Te::Invalid),
    (
        "linewrapped-crlf",
        "http-request-smuggler linewrapped (obs-fold)",
        b"Transfer-Encoding:\r\n chunked",
        Te::Invalid,
    ),
    ("linewrapped-value", "obs-fold, RFC 9112 §5.2", b"Transfer-Encoding: x\r\n chunked", Te::Invalid),
    ("gareth1", "http-request-smuggler gareth1", b"Transfer-Encoding\n : chunked", Te::Invalid),
    ("vertprefix1", "smuggler vertprefix1", b"Transfer-Encoding:\x0bchunked", Te::Invalid),
    ("ffprefix", "smuggler exhaustive (0x0c prefix)", b"Transfer-Encoding:\x0cchunked", Te::Invalid),
    ("vertsuffix", "smuggler exhaustive (0x0b suffix)", b"Transfer-Encoding: chunked\x0b", Te::Invalid),
    ("0dsuffix", "smuggler 0dsuffix", b"Transfer-Encoding: chunked\r", Te::Invalid),
    ("0dprefix", "SMUGGLEtest carriage return obfuscation", b"Transfer-Encoding:\rchunked", Te::Invalid),
    ("nul-prefix", "SMUGGLEtest \\x00chunked", b"Transfer-Encoding: \x00chunked", Te::Open),
    ("nul-suffix", "HTTP Garden NUL in field values", b"Transfer-Encoding: chunked\x00", Te::Open),
    ("nul-inside", "HTTP Garden NUL in field values", b"Transfer-Encoding: chu\x00nked", Te::Invalid),
    ("nul-name", "HTTP Garden NUL in field names", b"Transfer-Encoding\x00: chunked", Te::Invalid),
    ("quoted", "smuggler quoted", b"Transfer-Encoding: \"chunked\"", Te::Invalid),
    ("aposed", "smuggler aposed", b"Transfer-Encoding: 'chunked'", Te::Invalid),
    ("lazygrep", "smuggler lazygrep", b"Transfer-Encoding: chunk", Te::Invalid),
    ("xchunked", "SMUGGLEtest xchunked", b"Transfer-Encoding: xchunked", Te::Invalid),
    ("chunkedx", "substring match on chunked", b"Transfer-Encoding: chunked-false", Te::Invalid),
    ("inner-space", "http-request-smuggler spjunk", b"Transfer-Encoding: chun ked", Te::Invalid),
    ("accent", "http-request-smuggler accentCH", b"Transfer-Encoding: ch\xc3\xb9nked", Te::Invalid),
    ("nbsp-prefix", "Unicode whitespace trimming", b"Transfer-Encoding: \xa0chunked", Te::Invalid),
    ("double-colon", "smuggler exhaustive (colon in value)", b"Transfer-Encoding:: chunked", Te::Invalid),
    ("commaCow", "smuggler commaCow", b"Transfer-Encoding: chunked, cow", Te::Invalid),
    ("cowComma", "smuggler cowComma", b"Transfer-Encoding: cow, chunked", Te::Open),
    (
        "chunked-identity",
        "SMUGGLEtest chunked, identity",
        b"Transfer-Encoding: chunked, identity",
        Te::Invalid,
    ),
    ("identity-chunked", "SMUGGLEtest identity, chunked", b"Transfer-Encoding: identity, chunked", Te::Open),
    ("identity", "RFC 7230 identity coding", b"Transfer-Encoding: identity", Te::Invalid),
    ("gzip", "RFC 9112 §6.3 final coding not chunked", b"Transfer-Encoding: gzip", Te::Invalid),
    ("gzip-chunked", "RFC 9112 §6.1 coding list", b"Transfer-Encoding: gzip, chunked", Te::Open),
    (
        "chunked-chunked",
        "RFC 9112 §6.1 chunked applied twice",
        b"Transfer-Encoding: chunked, chunked",
        Te::Open,
    ),
    (
        "dualchunk",
        "http-request-smuggler dualchunk",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        Te::Open,
    ),
    (
        "revdualchunk",
        "smuggler revdualchunk",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: cow",
        Te::Invalid,
    ),
    (
        "cow-then-chunked",
        "smuggler dualchunk variants",
        b"Transfer-Encoding: cow\r\nTransfer-Encoding: chunked",
        Te::Open,
    ),
    (
        "empty-then-chunked",
        "SMUGGLEtest duplicate header",
        b"Transfer-Encoding:\r\nTransfer-Encoding: chunked",
        Te::Open,
    ),
    ("leading-comma", "RFC 9110 §5.6.1 empty list elements", b"Transfer-Encoding: ,chunked", Te::Open),
    ("trailing-comma", "RFC 9110 §5.6.1 empty list elements", b"Transfer-Encoding: chunked,", Te::Open),
    ("params", "RFC 9112 §7 chunked has no parameters", b"Transfer-Encoding: chunked;ext=val", Te::Open),
    ("empty", "smuggler exhaustive (empty value)", b"Transfer-Encoding:", Te::Open),
    ("bare-lf-after", "bare LF line end, RFC 9112 §2.2", b"Transfer-Encoding: chunked\nX-Pad: 1", Te::Open),
    (
        "bare-lf-before",
        "http-request-smuggler bodysplit-style LF",
        b"X-Pad: 1\nTransfer-Encoding: chunked",
        Te::Open,
    ),
    ("underjoin1", "smuggler underjoin1", b"Transfer_Encoding: chunked", Te::Absent),
    ("spacejoin1", "smuggler spacejoin1", b"Transfer Encoding: chunked", Te::Invalid),
    ("smashed", "smuggler smashed", b"Transfer Encoding:chunked", Te::Invalid),
    ("contentEnc", "smuggler contentEnc", b"Content-Encoding: chunked", Te::Absent),
    ("x-prefixed", "http-request-smuggler prefixed name", b"X-Transfer-Encoding: chunked", Te::Absent),
];

/// Every Transfer-Encoding mutation in four shapes: CL.TE, TE.CL, TE alone, TE.TE.
fn te_cases(out: &mut Vec<Case>) {
    // CL.TE: a Content-Length front end forwards the whole body; a chunked back end ends the
    // body at `0` and reads the smuggled request.
    let cl_te_body = [b"0\r\n\r\n".as_slice(), SMUG].concat();
    // TE.CL: a chunked front end forwards one chunk holding the smuggled request; a
    // Content-Length back end reads 2 bytes. The chunk extension makes the rest of the size line
    // garbage to a Content-Length reader, so that reading cannot parse a request from it.
    let te_cl_body = [format!("{:x};e=1\r\n", SMUG.len()).as_bytes(), SMUG, b"\r\n0\r\n\r\n"].concat();
    let te_body = b"5\r\nhello\r\n0\r\n\r\n".to_vec();
    for &(name, source, line, class) in TE_MUTATIONS {
        let cl_te_len = cl(cl_te_body.len());
        let payload = req("POST", &[line, &cl_te_len], &cl_te_body);
        let case = match class {
            Te::Chunked => {
                Case::new(format!("cl.te/{name}"), source, "POST", payload, Expect::Close).body(b"")
            }
            Te::Invalid => Case::new(format!("cl.te/{name}"), source, "POST", payload, Expect::Refuse(400)),
            Te::Absent => {
                Case::new(format!("cl.te/{name}"), source, "POST", payload, Expect::Keep).body(&cl_te_body)
            }
            Te::Open => Case::new(format!("cl.te/{name}"), source, "POST", payload, Expect::Either),
        };
        out.push(case);

        let payload = req("POST", &[line, b"Content-Length: 2"], &te_cl_body);
        let case = match class {
            Te::Chunked => {
                Case::new(format!("te.cl/{name}"), source, "POST", payload, Expect::Close).body(SMUG)
            }
            Te::Invalid => Case::new(format!("te.cl/{name}"), source, "POST", payload, Expect::Refuse(400)),
            Te::Absent => Case::new(format!("te.cl/{name}"), source, "POST", payload, Expect::Forward)
                .body(&te_cl_body[..2]),
            Te::Open => Case::new(format!("te.cl/{name}"), source, "POST", payload, Expect::Either),
        };
        out.push(case);

        let payload = req("POST", &[line], &te_body);
        let case = match class {
            Te::Chunked => {
                Case::new(format!("te/{name}"), source, "POST", payload, Expect::Keep).body(b"hello")
            }
            Te::Invalid => Case::new(format!("te/{name}"), source, "POST", payload, Expect::Refuse(400)),
            // No framing header left: no body, and the chunked bytes are a bad next request.
            Te::Absent => Case::new(format!("te/{name}"), source, "POST", payload, Expect::Forward).body(b""),
            Te::Open => Case::new(format!("te/{name}"), source, "POST", payload, Expect::Either),
        };
        out.push(case);

        // TE.TE: a plain `chunked` first, the mutation second (one side is meant to drop it).
        let payload = req("POST", &[b"Transfer-Encoding: chunked", line, b"Content-Length: 2"], &te_cl_body);
        let case = match class {
            Te::Chunked | Te::Open => {
                Case::new(format!("te.te/{name}"), source, "POST", payload, Expect::Either)
            }
            Te::Invalid => Case::new(format!("te.te/{name}"), source, "POST", payload, Expect::Refuse(400)),
            Te::Absent => {
                Case::new(format!("te.te/{name}"), source, "POST", payload, Expect::Close).body(SMUG)
            }
        };
        out.push(case);
    }
}

/// Chunked request bodies (`Transfer-Encoding: chunked`): (name, source, body, expectation,
/// body the upstream must get when forwarded).
fn chunk_cases(out: &mut Vec<Case>) {
    type Row = (&'static str, &'static str, Vec<u8>, Expect, Option<&'static [u8]>);
    let keep = Expect::Keep;
    let refuse = Expect::Refuse(400);
    let either = Expect::Either;
    let hello: Option<&'static [u8]> = Some(b"hello");
    // After a refused body the smuggled request follows, so that a parser that resynchronises
    // after the error (instead of closing) forwards it and shows up.
    let then_smuggle = |body: &[u8]| [body, SMUG].concat();
    let long_ext = [b"5;e=".as_slice(), &vec![b'x'; 70_000], b"\r\nhello\r\n0\r\n\r\n"].concat();
    let rows: Vec<Row> = vec![
        (
            "ext-token",
            "RFC 9112 §7.1.1 chunk-ext",
            b"5;name=value\r\nhello\r\n0\r\n\r\n".to_vec(),
            keep,
            hello,
        ),
        (
            "ext-quoted",
            "RFC 9112 §7.1.1 quoted chunk-ext-val",
            b"5;n=\"v a;l\"\r\nhello\r\n0\r\n\r\n".to_vec(),
            keep,
            hello,
        ),
        ("ext-bws", "RFC 9112 §7.1.1 BWS", b"5 ; n = v\r\nhello\r\n0\r\n\r\n".to_vec(), keep, hello),
        ("ext-name-only", "RFC 9112 §7.1.1", b"5;n\r\nhello\r\n0;m\r\n\r\n".to_vec(), keep, hello),
        ("ext-many", "RFC 9112 §7.1.1", b"5;a;b=1;c=\"x\"\r\nhello\r\n0\r\n\r\n".to_vec(), keep, hello),
        (
            "leading-zeros",
            "HTTP Garden chunk-size leading zeros",
            b"0005\r\nhello\r\n0000\r\n\r\n".to_vec(),
            keep,
            hello,
        ),
        (
            "upper-hex",
            "RFC 9112 §7.1 HEXDIG",
            b"A\r\n0123456789\r\n0\r\n\r\n".to_vec(),
            keep,
            Some(b"0123456789"),
        ),
        (
            "lower-hex",
            "RFC 9112 §7.1 HEXDIG",
            b"a\r\n0123456789\r\n0\r\n\r\n".to_vec(),
            keep,
            Some(b"0123456789"),
        ),
        ("many-chunks", "RFC 9112 §7.1", b"1\r\nh\r\n1\r\ne\r\n3\r\nllo\r\n0\r\n\r\n".to_vec(), keep, hello),
        (
            "trailer",
            "RFC 9112 §7.1.2 trailer section",
            b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n".to_vec(),
            keep,
            hello,
        ),
        (
            "trailer-cl",
            "trailer fields must not frame",
            b"5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n".to_vec(),
            keep,
            hello,
        ),
        (
            "trailer-te",
            "trailer fields must not frame",
            b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            keep,
            hello,
        ),
        ("empty", "RFC 9112 §7.1 last-chunk only", b"0\r\n\r\n".to_vec(), keep, Some(b"")),
        (
            "data-like-end",
            "funky chunks: data that looks like the end",
            b"7\r\n\r\n0\r\n\r\n\r\n0\r\n\r\n".to_vec(),
            keep,
            Some(b"\r\n0\r\n\r\n"),
        ),
        (
            "data-holds-request",
            "chunk data holding a request",
            chunk(SMUG).into_iter().chain(*b"0\r\n\r\n").collect(),
            keep,
            Some(SMUG),
        ),
        (
            "size-bare-lf",
            "funky chunks TERM (bare LF after size)",
            then_smuggle(b"5\nhello\r\n0\r\n\r\n"),
            refuse,
            None,
        ),
        (
            "data-bare-lf",
            "funky chunks bare LF after data",
            then_smuggle(b"5\r\nhello\n0\r\n\r\n"),
            refuse,
            None,
        ),
        (
            "last-bare-lf",
            "funky chunks bare LF after last-chunk",
            then_smuggle(b"5\r\nhello\r\n0\n\r\n"),
            refuse,
            None,
        ),
        // hyper reads a bare LF after the last chunk as the start of a trailer line (RFC 9112
        // §2.2 lets a recipient take LF as a line end); the smuggled request is swallowed into
        // that trailer section and dropped, never forwarded: refusing is not required.
        ("final-bare-lf", "funky chunks TRAIL.TERM", then_smuggle(b"5\r\nhello\r\n0\r\n\n"), either, None),
        (
            "ext-bare-lf",
            "funky chunks TERM.EXT (CVE-2025-55315)",
            then_smuggle(b"5;a\nhello\r\n0\r\n\r\n"),
            refuse,
            None,
        ),
        (
            "ext-lf-smuggle",
            "funky chunks TERM.EXT",
            [b"2;\nxx\r\n".as_slice(), &chunk(SMUG), b"0\r\n\r\n"].concat(),
            refuse,
            None,
        ),
        (
            "ext-bare-cr",
            "funky chunks bare CR in extension",
            then_smuggle(b"5;a\rb\r\nhello\r\n0\r\n\r\n"),
            refuse,
            None,
        ),
        (
            "size-bare-cr",
            "funky chunks bare CR after size",
            then_smuggle(b"5\rhello\r\n0\r\n\r\n"),
            refuse,
            None,
        ),
        (
            "data-no-crlf",
            "funky chunks missing CRLF after data",
            then_smuggle(b"5\r\nhelloXX0\r\n\r\n"),
            refuse,
            None,
        ),
        (
            "data-too-long",
            "funky chunks oversized chunk data",
            then_smuggle(b"3\r\nhello\r\n0\r\n\r\n"),
            refuse,
            None,
        ),
        (
            "data-cr-only",
            "funky chunks CR without LF after data",
            then_smuggle(b"5\r\nhello\r0\r\n\r\n"),
            refuse,
            None,
        ),
        ("size-0x", "HTTP Garden 0x chunk size", then_smuggle(b"0x5\r\nhello\r\n0\r\n\r\n"), refuse, None),
        (
            "size-plus",
            "HTTP Garden signed chunk size",
            then_smuggle(b"+5\r\nhello\r\n0\r\n\r\n"),
            refuse,
            None,
        ),
        (
            "size-minus",
            "HTTP Garden negative chunk size",
            then_smuggle(b"-5\r\nhello\r\n0\r\n\r\n"),
            refuse,
            None,
        ),
        (
            "size-leading-space",
            "HTTP Garden whitespace before chunk size",
            then_smuggle(b" 5\r\nhello\r\n0\r\n\r\n"),
            refuse,
            None,
        ),
        (
            "size-underscore",
            "HTTP Garden 0_5 chunk size",
            then_smuggle(b"0_5\r\nhello\r\n0\r\n\r\n"),
            refuse,
            None,
        ),
        ("size-empty", "funky chunks empty size line", then_smuggle(b"\r\nhello\r\n0\r\n\r\n"), refuse, None),
        ("size-not-hex", "RFC 9112 §7.1 chunk-size", then_smuggle(b"g\r\nhello\r\n0\r\n\r\n"), refuse, None),
        (
            "size-overflow",
            "HTTP Garden chunk-size overflow (wraps to 5)",
            then_smuggle(b"10000000000000005\r\nhello\r\n0\r\n\r\n"),
            refuse,
            None,
        ),
        (
            "size-junk-after",
            "funky chunks size followed by junk",
            then_smuggle(b"5 x\r\nhello\r\n0\r\n\r\n"),
            refuse,
            None,
        ),
        (
            "trailer-bare-lf",
            "funky chunks bare LF in trailer",
            then_smuggle(b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n"),
            either,
            None,
        ),
        (
            "size-trailing-space",
            "llhttp/hyper tolerate size LWS",
            b"5 \r\nhello\r\n0\r\n\r\n".to_vec(),
            either,
            None,
        ),
        (
            "size-trailing-tab",
            "llhttp/hyper tolerate size LWS",
            b"5\t\r\nhello\r\n0\r\n\r\n".to_vec(),
            either,
            None,
        ),
        (
            "ext-empty-name",
            "funky chunks empty extension",
            b"5;\r\nhello\r\n0\r\n\r\n".to_vec(),
            either,
            None,
        ),
        (
            "ext-no-value",
            "funky chunks extension without value",
            b"5;a=\r\nhello\r\n0\r\n\r\n".to_vec(),
            either,
            None,
        ),
        (
            "ext-open-quote",
            "funky chunks unterminated quote",
            b"5;a=\"x\r\nhello\r\n0\r\n\r\n".to_vec(),
            either,
            None,
        ),
        ("ext-nul", "Http11Probe CHUNK-EXT-CTRL", b"5;\x00a\r\nhello\r\n0\r\n\r\n".to_vec(), either, None),
        (
            "ext-huge",
            "hyper chunk extension limit (GHSA 2023, CVE-2023-39326 analogue)",
            long_ext,
            either,
            None,
        ),
        (
            "trailer-fold",
            "obs-fold in trailer",
            b"5\r\nhello\r\n0\r\nX-T: 1\r\n 2\r\n\r\n".to_vec(),
            either,
            None,
        ),
        (
            "trailer-no-colon",
            "trailer line without colon",
            b"5\r\nhello\r\n0\r\nbad\r\n\r\n".to_vec(),
            either,
            None,
        ),
        ("size-huge", "chunk size near 2^32", b"ffffffff\r\nhello".to_vec(), either, None),
    ];
    for (name, source, body, expect, forwarded) in rows {
        let mut case = Case::new(
            format!("chunk/{name}"),
            source,
            "POST",
            req("POST", &[b"Transfer-Encoding: chunked"], &body),
            expect,
        );
        case.body = forwarded.map(<[u8]>::to_vec);
        out.push(case);
    }
}

/// Content-Length values (one or more field lines) with the body `hello` (and, where a lenient
/// reading of 5 would leave it, a smuggled request after it).
fn cl_cases(out: &mut Vec<Case>) {
    let hello_smug = [b"hello".as_slice(), SMUG].concat();
    let keep: &[(&str, &str, &[&[u8]])] = &[
        ("plain", "RFC 9112 §6.2", &[b"Content-Length: 5"]),
        ("ows", "RFC 9110 §5.5 OWS around values", &[b"Content-Length:   5   "]),
        ("tab-ows", "RFC 9110 §5.5 OWS around values", &[b"Content-Length:\t5\t"]),
        ("leading-zeros", "HTTP Garden leading zeros", &[b"Content-Length: 0005"]),
        (
            "dup-identical",
            "RFC 9110 §8.6 identical duplicates (R1 merge)",
            &[b"Content-Length: 5", b"Content-Length: 5"],
        ),
        (
            "dup-case",
            "identical duplicates, differing name case",
            &[b"Content-Length: 5", b"content-LENGTH: 5"],
        ),
    ];
    for &(name, source, fields) in keep {
        out.push(
            Case::new(format!("cl/{name}"), source, "POST", req("POST", fields, b"hello"), Expect::Keep)
                .body(b"hello"),
        );
    }
    let refuse: &[(&str, &str, &[&[u8]])] = &[
        ("plus", "hyper GHSA-f3pg-qwvg-p99c (+ prefix)", &[b"Content-Length: +5"]),
        ("minus", "negative Content-Length", &[b"Content-Length: -5"]),
        ("hex", "HTTP Garden 0x Content-Length", &[b"Content-Length: 0x5"]),
        ("list-differing", "RFC 9110 §8.6 differing list", &[b"Content-Length: 5, 6"]),
        ("dup-differing", "smuggler CL.CL", &[b"Content-Length: 5", b"Content-Length: 6"]),
        ("dup-zero-first", "CL.CL zero first", &[b"Content-Length: 0", b"Content-Length: 5"]),
        ("decimal", "HTTP Garden decimal Content-Length", &[b"Content-Length: 5.0"]),
        ("exponent", "HTTP Garden exponent Content-Length", &[b"Content-Length: 5e0"]),
        ("inner-space", "digits split by space", &[b"Content-Length: 5 5"]),
        ("empty", "empty Content-Length", &[b"Content-Length:"]),
        ("alpha", "non-numeric Content-Length", &[b"Content-Length: five"]),
        ("space-before-colon", "http-request-smuggler space1 on Content-Length", &[b"Content-Length : 5"]),
        ("obs-fold", "0.CL via obs-fold", &[b"Content-Length:\r\n 5"]),
        ("nul", "HTTP Garden NUL after digits", &[b"Content-Length: 5\x00"]),
        ("vt-prefix", "smuggler vertprefix on Content-Length", &[b"Content-Length:\x0b5"]),
        ("fullwidth", "Unicode digit", &[b"Content-Length: \xef\xbc\x95"]),
        ("underscore-digits", "HTTP Garden 0_5", &[b"Content-Length: 0_5"]),
        (
            "overflow-u64",
            "HTTP Garden overflow (2^64 + 5 wraps to 5)",
            &[b"Content-Length: 18446744073709551621"],
        ),
        (
            "dup-list-differing",
            "CL.CL, second line a list",
            &[b"Content-Length: 5", b"Content-Length: 5, 40"],
        ),
    ];
    for &(name, source, fields) in refuse {
        out.push(Case::new(
            format!("cl/{name}"),
            source,
            "POST",
            req("POST", fields, &hello_smug),
            Expect::Refuse(400),
        ));
    }
    let either: &[(&str, &str, &[&[u8]])] = &[
        ("list-same", "RFC 9110 §8.6 identical list (MAY merge)", &[b"Content-Length: 5, 5"]),
        ("trailing-comma", "RFC 9110 §5.6.1 empty list element", &[b"Content-Length: 5,"]),
        ("u32-wrap", "HTTP Garden 2^32 + 5 wraps to 5", &[b"Content-Length: 4294967301"]),
        ("huge", "30-digit Content-Length", &[b"Content-Length: 100000000000000000000000000005"]),
    ];
    for &(name, source, fields) in either {
        out.push(Case::new(
            format!("cl/{name}"),
            source,
            "POST",
            req("POST", fields, &hello_smug),
            Expect::Either,
        ));
    }
    // CL.0: methods whose body a server might ignore must still have it forwarded as framed
    // (Kettle, "Browser-Powered Desync Attacks").
    for method in ["GET", "OPTIONS", "DELETE"] {
        let payload = req(method, &[&cl(SMUG.len())], SMUG);
        out.push(
            Case::new(
                format!("cl.0/{method}"),
                "Kettle CL.0 browser-powered desync",
                method,
                payload,
                Expect::Keep,
            )
            .body(SMUG),
        );
    }
    // Kettle: a hop-by-hop Content-Length (named in Connection) must not be dropped.
    let payload = req("POST", &[b"Connection: Content-Length", b"Content-Length: 5"], b"hello");
    out.push(
        Case::new("cl/connection-named", "Kettle hop-by-hop Content-Length", "POST", payload, Expect::Keep)
            .body(b"hello"),
    );
}

/// Host and request-target cases (R2, R5, the CONNECT/target rule): GETs without a body.
fn host_cases(out: &mut Vec<Case>) {
    let get = |host_lines: &[&[u8]]| {
        let mut all: Vec<&[u8]> = vec![b"GET /case-#### HTTP/1.1"];
        all.extend_from_slice(host_lines);
        lines(&all, b"")
    };
    let refuse: &[(&str, &str, &[&[u8]])] = &[
        ("duplicate-differing", "RFC 9112 §3.2 duplicate Host", &[b"Host: a", b"Host: b"]),
        ("duplicate-same", "RFC 9112 §3.2 exactly one Host", &[b"Host: a", b"Host: a"]),
        ("missing", "RFC 9112 §3.2 missing Host", &[b"X-Pad: 1"]),
        ("space", "Host `a b`", &[b"Host: a b"]),
        ("path-query-userinfo", "Host `evil/x?y@z`", &[b"Host: evil/x?y@z"]),
        ("empty", "empty Host", &[b"Host:"]),
        ("userinfo", "userinfo in Host", &[b"Host: u@a"]),
        ("port-alpha", "non-digit port", &[b"Host: a:b"]),
        ("two-ports", "two ports", &[b"Host: a:1:2"]),
        ("nul", "HTTP Garden NUL in Host", &[b"Host: a\x00b"]),
        ("backslash", "backslash in Host", &[b"Host: a\\b"]),
        ("open-bracket", "unclosed IP literal", &[b"Host: [::1"]),
        ("comma-list", "Host as a list", &[b"Host: a, b"]),
        ("space-before-colon", "smuggler space1 on Host", &[b"Host : a"]),
        ("obs-fold", "obs-fold Host", &[b"Host:\r\n a"]),
        ("folded-duplicate", "Host hidden by obs-fold", &[b"Host: a", b"X-Pad: 1\r\n Host: b"]),
    ];
    for &(name, source, host) in refuse {
        out.push(Case::new(format!("host/{name}"), source, "GET", get(host), Expect::Refuse(400)));
    }
    let keep: &[(&str, &str, &[u8], &'static str)] = &[
        ("port", "RFC 3986 authority with port", b"Host: a:8080", "a:8080"),
        ("ipv6", "RFC 3986 IP-literal", b"Host: [::1]:80", "[::1]:80"),
        ("ipv4", "RFC 3986 IPv4address", b"Host: 127.0.0.1", "127.0.0.1"),
        ("pct-encoded", "RFC 3986 pct-encoded reg-name", b"Host: ex%41mple", "ex%41mple"),
        ("upper-name", "field names are case-insensitive", b"HOST: a", "a"),
        ("trailing-dot", "FQDN with trailing dot", b"Host: a.", "a."),
    ];
    for &(name, source, host, forwarded) in keep {
        out.push(
            Case::new(format!("host/{name}"), source, "GET", get(&[host]), Expect::Keep).host(forwarded),
        );
    }
    out.push(Case::new("host/empty-port", "RFC 3986 empty port", "GET", get(&[b"Host: a:"]), Expect::Either));

    let absolute = |target: &[u8], host_lines: &[&[u8]]| {
        let line = [b"GET ".as_slice(), target, b" HTTP/1.1"].concat();
        let mut all: Vec<&[u8]> = vec![&line];
        all.extend_from_slice(host_lines);
        lines(&all, b"")
    };
    let source = "RFC 9112 §3.2.2 absolute-form overrides Host";
    out.push(
        Case::new(
            "target/absolute-other-host",
            source,
            "GET",
            absolute(b"http://b/case-####", &[b"Host: a"]),
            Expect::Keep,
        )
        .host("b"),
    );
    out.push(
        Case::new(
            "target/absolute-port",
            source,
            "GET",
            absolute(b"http://b:81/case-####", &[b"Host: a"]),
            Expect::Keep,
        )
        .host("b:81"),
    );
    out.push(
        Case::new(
            "target/absolute-fragment",
            source,
            "GET",
            absolute(b"http://b/case-#####x", &[b"Host: a"]),
            Expect::Keep,
        )
        .host("b"),
    );
    let refuse_abs: &[(&str, &[u8])] = &[
        ("absolute-userinfo", b"http://u@b/case-####"),
        ("absolute-bad-authority", b"http://b%/case-####"),
        ("absolute-empty-authority", b"http:///case-####"),
        ("absolute-bad-port", b"http://b:x/case-####"),
    ];
    for &(name, target) in refuse_abs {
        out.push(Case::new(
            format!("target/{name}"),
            source,
            "GET",
            absolute(target, &[b"Host: a"]),
            Expect::Refuse(400),
        ));
    }
    out.push(Case::new(
        "target/absolute-no-host",
        source,
        "GET",
        absolute(b"http://b/case-####", &[]),
        Expect::Either,
    ));
    out.push(Case::new(
        "target/absolute-https",
        source,
        "GET",
        absolute(b"https://b/case-####", &[b"Host: a"]),
        Expect::Either,
    ));
    out.push(Case::new(
        "target/absolute-dup-host",
        source,
        "GET",
        absolute(b"http://b/case-####", &[b"Host: a", b"Host: c"]),
        Expect::Either,
    ));

    let fragment = "RFC 9110 §4.2.5 fragment not sent (R5)";
    out.push(Case::new("target/fragment", fragment, "GET", get_target(b"/case-#####frag"), Expect::Keep));
    out.push(
        Case::new("target/fragment-query", fragment, "GET", get_target(b"/case-####?a=1#frag"), Expect::Keep)
            .target("/case-####?a=1"),
    );
    out.push(Case::new(
        "target/fragment-smuggle",
        fragment,
        "GET",
        get_target(b"/case-#####/smuggled-####"),
        Expect::Keep,
    ));
}

fn get_target(target: &[u8]) -> Vec<u8> {
    let line = [b"GET ".as_slice(), target, b" HTTP/1.1"].concat();
    lines(&[&line, b"Host: a"], b"")
}

/// Request-line oddities, versions, head size limits.
fn request_line_cases(out: &mut Vec<Case>) {
    let raw = |bytes: &[u8]| bytes.to_vec();
    let te_hello = b"5\r\nhello\r\n0\r\n\r\n";
    let rows: Vec<(&str, &str, Vec<u8>, Expect)> = vec![
        (
            "http10-te",
            "RFC 9112 §6.1 TE in HTTP/1.0 (R1)",
            lines(&[b"POST /case-#### HTTP/1.0", b"Host: a", b"Transfer-Encoding: chunked"], te_hello),
            Expect::Refuse(400),
        ),
        (
            "http10-te-cl",
            "RFC 9112 §6.1 TE in HTTP/1.0 (R1)",
            lines(
                &[
                    b"POST /case-#### HTTP/1.0",
                    b"Host: a",
                    b"Transfer-Encoding: chunked",
                    b"Content-Length: 19",
                ],
                te_hello,
            ),
            Expect::Refuse(400),
        ),
        ("http09", "HTTP/0.9 simple request", raw(b"GET /case-####\r\n"), Expect::Reject),
        (
            "extra-token",
            "request line with four parts",
            get_line(b"GET /case-#### HTTP/1.1 x"),
            Expect::Refuse(400),
        ),
        (
            "double-space",
            "RFC 9112 §3 whitespace-delimited parsing",
            get_line(b"GET  /case-#### HTTP/1.1"),
            Expect::Either,
        ),
        (
            "tab-separator",
            "RFC 9112 §3 whitespace-delimited parsing",
            get_line(b"GET\t/case-####\tHTTP/1.1"),
            Expect::Either,
        ),
        (
            "http2-version",
            "HTTP/2.0 on an HTTP/1 connection",
            get_line(b"GET /case-#### HTTP/2.0"),
            Expect::Reject,
        ),
        (
            "http12-version",
            "RFC 9110 §2.5 higher minor version",
            get_line(b"GET /case-#### HTTP/1.2"),
            Expect::Either,
        ),
        (
            "lowercase-version",
            "RFC 9112 §2.3 HTTP-name is case-sensitive",
            get_line(b"GET /case-#### http/1.1"),
            Expect::Reject,
        ),
        ("no-version", "HTTP/0.9-like two-part line", get_line(b"GET /case-####"), Expect::Reject),
        ("no-slash", "target not a path", get_line(b"GET case-#### HTTP/1.1"), Expect::Refuse(400)),
        ("asterisk-get", "asterisk-form on GET", get_line(b"GET * HTTP/1.1"), Expect::Refuse(400)),
        ("connect", "CONNECT (R: refused)", get_line(b"CONNECT a:443 HTTP/1.1"), Expect::Refuse(400)),
        (
            "nul-target",
            "HTTP Garden NUL in target",
            get_line(b"GET /case-####\x00 HTTP/1.1"),
            Expect::Refuse(400),
        ),
        (
            "nul-method",
            "HTTP Garden NUL in method",
            get_line(b"G\x00ET /case-#### HTTP/1.1"),
            Expect::Refuse(400),
        ),
        (
            "space-in-target",
            "unencoded space in target",
            get_line(b"GET /case-#### x HTTP/1.1"),
            Expect::Refuse(400),
        ),
        ("del-target", "DEL in target", get_line(b"GET /case-####\x7f HTTP/1.1"), Expect::Either),
        (
            "bare-lf-request-line",
            "RFC 9112 §2.2 bare LF (MAY)",
            raw(b"GET /case-#### HTTP/1.1\nHost: a\r\n\r\n"),
            Expect::Either,
        ),
        (
            "bare-lf-everywhere",
            "RFC 9112 §2.2 bare LF (MAY)",
            raw(b"GET /case-#### HTTP/1.1\nHost: a\n\n"),
            Expect::Either,
        ),
        (
            "bare-cr-request-line",
            "RFC 9112 §2.2 bare CR",
            raw(b"GET /case-#### HTTP/1.1\rHost: a\r\n\r\n"),
            Expect::Refuse(400),
        ),
        (
            "bare-cr-field",
            "RFC 9112 §2.2 bare CR",
            raw(b"GET /case-#### HTTP/1.1\r\nHost: a\rX: 1\r\n\r\n"),
            Expect::Refuse(400),
        ),
        (
            "leading-crlf",
            "RFC 9112 §2.2 empty line before request",
            raw(b"\r\nGET /case-#### HTTP/1.1\r\nHost: a\r\n\r\n"),
            Expect::Either,
        ),
        (
            "ws-after-start-line",
            "RFC 9112 §2.2 whitespace-led first field line",
            lines(
                &[
                    b"POST /case-#### HTTP/1.1",
                    b" Transfer-Encoding: chunked",
                    b"Host: a",
                    &cl(5 + SMUG.len()),
                ],
                &[b"0\r\n\r\n".as_slice(), SMUG].concat(),
            ),
            Expect::Either,
        ),
        (
            "field-no-colon",
            "field line without a colon",
            get_fields(&[b"Host: a", b"X-Pad"]),
            Expect::Refuse(400),
        ),
        ("field-empty-name", "field line `: x`", get_fields(&[b"Host: a", b": x"]), Expect::Refuse(400)),
        (
            "field-name-space",
            "space inside a field name",
            get_fields(&[b"Host: a", b"X Pad: 1"]),
            Expect::Refuse(400),
        ),
        (
            "field-name-slash",
            "non-token field name",
            get_fields(&[b"Host: a", b"X/Pad: 1"]),
            Expect::Refuse(400),
        ),
        (
            "field-value-nul",
            "HTTP Garden NUL in value",
            get_fields(&[b"Host: a", b"X-Pad: a\x00b"]),
            Expect::Either,
        ),
        (
            "field-value-ctl",
            "control byte in value",
            get_fields(&[b"Host: a", b"X-Pad: a\x01b"]),
            Expect::Either,
        ),
        (
            "obs-fold-other",
            "obs-fold (R1)",
            get_fields(&[b"Host: a", b"X-Pad: 1", b" 2"]),
            Expect::Refuse(400),
        ),
        (
            "header-oversize",
            "head over client.max_header_bytes",
            get_fields(&[b"Host: a", &[b"X-Big: ".as_slice(), &[b'a'; 20_000]].concat()]),
            Expect::Refuse(431),
        ),
        (
            "uri-oversize",
            "request line over the head limit",
            get_line(&[b"GET /case-####?".as_slice(), &[b'a'; 20_000], b" HTTP/1.1"].concat()),
            Expect::Reject,
        ),
        (
            "many-fields",
            "many small fields",
            get_fields(
                &std::iter::once(b"Host: a".as_slice())
                    .chain(std::iter::repeat_n(b"X-N: 1".as_slice(), 300))
                    .collect::<Vec<_>>(),
            ),
            Expect::Either,
        ),
        (
            "http10-cl",
            "HTTP/1.0 with Content-Length",
            lines(&[b"POST /case-#### HTTP/1.0", b"Host: a", b"Content-Length: 5"], b"hello"),
            Expect::Forward,
        ),
        (
            "http10-keep-alive",
            "HTTP/1.0 keep-alive",
            lines(&[b"GET /case-#### HTTP/1.0", b"Host: a", b"Connection: keep-alive"], b""),
            Expect::Forward,
        ),
    ];
    for (name, source, payload, expect) in rows {
        let method = if payload.starts_with(b"POST") { "POST" } else { "GET" };
        let mut case = Case::new(format!("line/{name}"), source, method, payload, expect);
        if name == "http10-cl" {
            case = case.body(b"hello");
        }
        out.push(case);
    }
}

fn get_line(line: &[u8]) -> Vec<u8> {
    lines(&[line, b"Host: a"], b"")
}

fn get_fields(fields: &[&[u8]]) -> Vec<u8> {
    let mut all: Vec<&[u8]> = vec![b"GET /case-#### HTTP/1.1"];
    all.extend_from_slice(fields);
    lines(&all, b"")
}

/// Underscored names (R3) and hop-by-hop fields (R4): forwarded without them.
fn field_cases(out: &mut Vec<Case>) {
    let keep: &[(&str, &str, &[&[u8]])] = &[
        ("x-forwarded-for", "underscore spoofing X_Forwarded_For (R3)", &[b"X_Forwarded_For: 6.6.6.6"]),
        ("content-length", "underscore Content_Length (R3)", &[b"Content_Length: 5"]),
        ("transfer-encoding", "underscore Transfer_Encoding (R3)", &[b"Transfer_Encoding: chunked"]),
        ("host", "underscore Ho_st (R3)", &[b"Ho_st: b"]),
        ("only", "name `_` (R3)", &[b"_: x"]),
        ("mixed", "underscore X-Real_IP (R3)", &[b"X-Real_IP: 6.6.6.6"]),
    ];
    for &(name, source, fields) in keep {
        out.push(
            Case::new(format!("underscore/{name}"), source, "GET", req("GET", fields, b""), Expect::Keep)
                .body(b""),
        );
    }
    let hop: &[(&str, &str, &[&[u8]])] = &[
        ("named", "RFC 9110 §7.6.1 Connection-named field", &[b"Connection: x-hop-a", b"X-Hop-A: 1"]),
        (
            "named-many",
            "RFC 9110 §7.6.1 several tokens",
            &[b"Connection: keep-alive, X-Hop-B,x-hop-c", b"X-Hop-B: 1", b"x-hop-c: 2"],
        ),
        (
            "named-twice",
            "RFC 9110 §7.6.1 two Connection lines",
            &[b"Connection: x-hop-d", b"Connection: x-hop-e", b"X-Hop-D: 1", b"X-Hop-E: 1"],
        ),
        ("host-named", "Connection: host must keep Host (R4)", &[b"Connection: host"]),
        ("keep-alive", "RFC 9110 §7.6.1 Keep-Alive", &[b"Keep-Alive: timeout=5"]),
        ("proxy-connection", "RFC 9110 §7.6.1 Proxy-Connection", &[b"Proxy-Connection: keep-alive"]),
        ("te-trailers", "RFC 9110 §7.6.1 TE", &[b"TE: trailers"]),
        ("proxy-authorization", "R4 Proxy-Authorization", &[b"Proxy-Authorization: Basic eDp5"]),
    ];
    for &(name, source, fields) in hop {
        out.push(
            Case::new(format!("hop/{name}"), source, "GET", req("GET", fields, b""), Expect::Keep).body(b""),
        );
    }
    out.push(
        Case::new(
            "hop/close-named",
            "RFC 9110 §7.6.1 close plus a named field",
            "GET",
            req("GET", &[b"Connection: close, x-hop-f", b"X-Hop-F: 1"], b""),
            Expect::Close,
        )
        .body(b""),
    );
    out.push(
        Case::new(
            "hop/expect-100",
            "RFC 9110 §10.1.1 Expect: 100-continue",
            "POST",
            req("POST", &[b"Expect: 100-continue", b"Content-Length: 5"], b"hello"),
            Expect::Keep,
        )
        .body(b"hello"),
    );
}

fn client_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    te_cases(&mut cases);
    chunk_cases(&mut cases);
    cl_cases(&mut cases);
    host_cases(&mut cases);
    request_line_cases(&mut cases);
    field_cases(&mut cases);
    cases
}

/// Which of the proxy's HTTP/1.1 codecs serves the case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Path {
    /// The case is the first request of its connection.
    Fast,
    /// A priming request has handed the connection to hyper first.
    Hyper,
}

const PATHS: [Path; 2] = [Path::Fast, Path::Hyper];

/// The run number of case `index` on `path`: unique per run, so recordings map back.
fn run_id(index: usize, path: Path) -> usize {
    2 * index + 1 + usize::from(path == Path::Hyper)
}

/// How reading the answers ended.
#[derive(Debug)]
enum End {
    /// The answer to the last request of interest (the canary) arrived.
    Done,
    Closed,
    Cut(Vec<u8>),
    Malformed(String, Vec<u8>),
    Timeout(Vec<u8>),
}

struct Got {
    answers: Vec<raw::Response>,
    end: End,
    /// Why the priming request failed, on the hyper path.
    prime_failed: Option<String>,
}

fn show_answer(answer: &Answer) -> String {
    match answer {
        Answer::Response(r) => show_response(r),
        Answer::Closed => "closed".to_owned(),
        Answer::Cut(bytes) => format!("cut after {:?}", raw::show(bytes, 80)),
        Answer::Malformed(reason, bytes) => format!("malformed ({reason}): {:?}", raw::show(bytes, 80)),
        Answer::Timeout(bytes) => format!("timeout with {:?} pending", raw::show(bytes, 80)),
    }
}

fn show_response(r: &raw::Response) -> String {
    match r.header("x-rollout-error") {
        Some(error) => format!("{} {error}", r.status),
        None => format!("{} {:?}", r.status, raw::show(&r.body, 60)),
    }
}

impl Got {
    fn show(&self) -> String {
        let mut parts: Vec<String> = self.answers.iter().map(show_response).collect();
        parts.push(match &self.end {
            End::Done => "(open)".to_owned(),
            End::Closed => "closed".to_owned(),
            End::Cut(bytes) => format!("cut after {:?}", raw::show(bytes, 60)),
            End::Malformed(reason, bytes) => format!("malformed ({reason}): {:?}", raw::show(bytes, 60)),
            End::Timeout(bytes) if bytes.is_empty() => "no more bytes within the timeout".to_owned(),
            End::Timeout(bytes) => format!("timeout with {:?} pending", raw::show(bytes, 60)),
        });
        parts.join(" | ")
    }
}

/// Sends `requests` (after `prime` on the hyper path) and reads answers until the one whose body
/// is `last_body`, a close, or the timeout.
async fn exchange(addr: SocketAddr, prime: Option<Vec<u8>>, requests: &[Vec<u8>], last_body: &str) -> Got {
    let mut conn = RawConn::connect(addr).await;
    if let Some(prime) = prime {
        conn.send(&prime).await;
        let answer = conn.next_answer(false, Instant::now() + READ_TIMEOUT).await;
        let ok =
            matches!(&answer, Answer::Response(r) if r.status == 200 && r.body_text().contains("/prime-"));
        if !ok {
            return Got { answers: Vec::new(), end: End::Closed, prime_failed: Some(show_answer(&answer)) };
        }
    }
    for request in requests {
        // A proxy that refuses early may close before everything is written.
        if !conn.send(request).await {
            break;
        }
    }
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut answers = Vec::new();
    let end = loop {
        match conn.next_answer(false, deadline).await {
            Answer::Response(r) => {
                let last = r.body_text() == last_body;
                answers.push(r);
                if last {
                    break End::Done;
                }
            }
            Answer::Closed => break End::Closed,
            Answer::Cut(bytes) => break End::Cut(bytes),
            Answer::Malformed(reason, bytes) => break End::Malformed(reason, bytes),
            Answer::Timeout(bytes) => break End::Timeout(bytes),
        }
    };
    Got { answers, end, prime_failed: None }
}

/// Runs `count` jobs, `CONCURRENCY` at a time; returns their results by index.
async fn run_all<T, F, Fut>(count: usize, job: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut set = JoinSet::new();
    for index in 0..count {
        let permit = permits.clone().acquire_owned().await.unwrap();
        let future = job(index);
        set.spawn(async move {
            let result = future.await;
            drop(permit);
            (index, result)
        });
    }
    let mut results: BTreeMap<usize, T> = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        let (index, result) = joined.expect("a case panicked");
        results.insert(index, result);
    }
    results.into_values().collect()
}

/// The config for one proxy whose pools are `v1` and `v2`, without passive ejection (the
/// corpus makes upstreams fail on purpose; ejection would turn later cases into 503s).
fn corpus_config(v1: SocketAddr, v2: SocketAddr) -> ConfigBuilder {
    ConfigBuilder::new()
        .v1("v1a", v1, 1)
        .v2("v2a", v2, 1)
        .ejection(Pool::V1, Ejection::off())
        .ejection(Pool::V2, Ejection::off())
}

/// Recordings by run number; recordings that name no run go under 0.
fn by_run(events: Vec<Recorded>) -> BTreeMap<usize, Vec<Recorded>> {
    let mut map: BTreeMap<usize, Vec<Recorded>> = BTreeMap::new();
    for event in events {
        let ids = event.case_numbers();
        if ids.is_empty() {
            map.entry(0).or_default().push(event);
        } else {
            for id in ids {
                map.entry(id).or_default().push(event.clone());
            }
        }
    }
    map
}

fn has_marker(target: &str, marker: &str, id: usize) -> bool {
    raw::markers(target.as_bytes()).contains(&(marker_static(marker), id))
}

fn marker_static(marker: &str) -> &'static str {
    raw::MARKERS.iter().find(|m| **m == marker).expect("a known marker")
}

/// What a run came to, compared between the two paths: status class of the first answer (or how
/// the connection ended without one) and whether the case reached the upstream.
fn outcome_class(got: &Got, forwarded: bool) -> String {
    let first = match (got.answers.first(), &got.end) {
        (Some(r), _) => format!("{}xx", r.status / 100),
        (None, End::Closed) => "closed".to_owned(),
        (None, End::Timeout(_)) => "no answer".to_owned(),
        (None, other) => format!("{other:?}").chars().take(12).collect(),
    };
    format!("{first}, {}", if forwarded { "forwarded" } else { "not forwarded" })
}

/// An error answer that did not come from the recording upstream (which marks its own 400 with
/// `x-upstream-violation`) nor carries the proxy's `x-rollout-error`: an error some codec
/// wrote by itself.
fn is_bare_error(r: &raw::Response) -> bool {
    r.status >= 400 && r.header("x-rollout-error").is_none() && r.header("x-upstream-violation").is_none()
}

/// The refusal hyper's HTTP/1.1 parser writes by itself for a head it cannot read at all (the
/// README documents it): 400, 414 or 431 with an empty body, the last answer, the connection
/// closed after it. It carries no `x-rollout-error` because no code of the proxy's runs.
fn is_parser_refusal(r: &raw::Response, last: bool, end: &End) -> bool {
    matches!(r.status, 400 | 414 | 431) && r.body.is_empty() && last && matches!(end, End::Closed)
}

/// An answer the proxy made itself.
fn is_proxy_error(r: &raw::Response) -> bool {
    r.header("x-rollout-error").is_some() || is_bare_error(r)
}

/// The failures of one client run.
fn check_client(case: &Case, id: usize, got: &Got, recorded: &[Recorded]) -> (Vec<String>, bool) {
    let mut fails = Vec::new();
    if let Some(why) = &got.prime_failed {
        fails.push(format!("priming request failed: {why}"));
        return (fails, false);
    }
    let case_target = text(case.target, id);
    let case_answer = format!("seen {} {case_target}", case.method);
    let canary_answer = text("seen GET /canary-####", id);

    // What reached the upstream.
    let mut forwarded: Vec<&raw::Request> = Vec::new();
    for event in recorded {
        match &event.seen {
            Seen::Violation(reason) => {
                fails.push(format!("upstream saw a violation ({reason}) in {:?}", raw::show(&event.raw, 120)))
            }
            Seen::Request(r) if has_marker(&r.target, "/smuggled-", id) => {
                fails.push(format!("smuggled request reached the upstream: {} {}", r.method, r.target))
            }
            Seen::Request(r) if has_marker(&r.target, "/case-", id) => forwarded.push(r),
            Seen::Request(r) if r.target.starts_with("/canary-") || r.target.starts_with("/prime-") => {}
            Seen::Request(r) => {
                fails.push(format!("unexpected request reached the upstream: {} {}", r.method, r.target))
            }
            Seen::Aborted => {}
        }
    }
    if forwarded.len() > 1 {
        fails.push(format!("the case reached the upstream {} times", forwarded.len()));
    }

    // Every answer is the proxy's own or one for a request the client sent, in order.
    let mut stage = 0;
    let mut answered_case = false;
    for (i, r) in got.answers.iter().enumerate() {
        let body = r.body_text();
        if r.header("x-rollout-error").is_some() {
            continue;
        }
        if is_bare_error(r) {
            if !is_parser_refusal(r, i + 1 == got.answers.len(), &got.end) {
                fails.push(format!(
                    "answer #{} is an error without x-rollout-error (fields {:?}, body {:?})",
                    i + 1,
                    r.fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
                    raw::show(&r.body, 40)
                ));
            }
            continue;
        }
        if stage == 0 && i == 0 && r.status == 200 && body == case_answer {
            stage = 1;
            answered_case = true;
        } else if r.status == 200 && body == canary_answer {
            stage = 2;
        } else {
            fails.push(format!("desync: answer #{} is {}", i + 1, show_response(r)));
        }
    }
    match &got.end {
        End::Cut(_) | End::Malformed(..) => {
            fails.push("the proxy's answer is not a valid HTTP/1.1 response".to_owned())
        }
        End::Timeout(pending) if !pending.is_empty() => {
            fails.push("a partial answer was left pending".to_owned())
        }
        _ => {}
    }

    let first = got.answers.first();
    let closed = matches!(got.end, End::Closed);
    let check_forwarded = |fails: &mut Vec<String>| {
        if !answered_case {
            fails.push(format!("the first answer is not `{case_answer}`"));
        }
        match forwarded.first() {
            None => fails.push("the case never reached the upstream".to_owned()),
            Some(r) => {
                if r.target != case_target {
                    fails.push(format!("upstream got target {} instead of {case_target}", r.target));
                }
                if r.method != case.method {
                    fails.push(format!("upstream got method {}", r.method));
                }
                let hosts = r.header("host");
                if hosts != [case.host] {
                    fails.push(format!("upstream got Host {hosts:?} instead of {}", case.host));
                }
                if let Some(body) = case.body.as_deref().map(|b| fill(b, id)) {
                    if r.body != body {
                        fails.push(format!(
                            "upstream got body {:?} instead of {:?}",
                            raw::show(&r.body, 60),
                            raw::show(&body, 60)
                        ));
                    }
                }
            }
        }
    };
    match case.expect {
        Expect::Keep => {
            check_forwarded(&mut fails);
            if stage != 2 {
                fails.push("the canary after the case was not answered".to_owned());
            }
        }
        Expect::Close => {
            check_forwarded(&mut fails);
            if stage == 2 || !closed {
                fails.push("the connection was not closed after the answer (TE + CL, R1)".to_owned());
            }
        }
        Expect::Forward => check_forwarded(&mut fails),
        Expect::Refuse(status) => {
            // (an error answer without x-rollout-error is reported above)
            let refused = first.is_some_and(|r| r.status == status && is_proxy_error(r));
            if !refused {
                fails.push(format!("not refused with the proxy's {status}"));
            } else if got.answers.len() > 1 || !closed {
                fails.push(format!("the connection was not closed after the {status}"));
            }
            if !forwarded.is_empty() {
                fails.push("the refused request reached the upstream".to_owned());
            }
        }
        Expect::Reject => {
            if let Some(r) = forwarded.first() {
                fails.push(format!(
                    "the request was forwarded as {} {}",
                    r.method,
                    raw::show(r.target.as_bytes(), 60)
                ));
            } else if answered_case {
                fails.push("the request was answered by the upstream".to_owned());
            }
        }
        Expect::Either => {}
    }
    (fails, !forwarded.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_to_proxy_corpus() {
    let started = std::time::Instant::now();
    let (upstream, recording) = raw::spawn_recording_upstream().await;
    let proxy = ProxyBuilder::new(&corpus_config(upstream, upstream)).spawn().await;
    let addr = proxy.addr;
    let cases = Arc::new(client_cases());
    let runs: Vec<(usize, Path)> = (0..cases.len()).flat_map(|i| PATHS.map(|p| (i, p))).collect();
    let runs = Arc::new(runs);

    let jobs = (runs.clone(), cases.clone());
    let results = run_all(runs.len(), move |n| {
        let (runs, cases) = (jobs.0.clone(), jobs.1.clone());
        async move {
            let (index, path) = runs[n];
            let id = run_id(index, path);
            let prime = (path == Path::Hyper).then(|| fill(PRIME, id));
            let requests = [fill(&cases[index].payload, id), fill(CANARY, id)];
            exchange(addr, prime, &requests, &text("seen GET /canary-####", id)).await
        }
    })
    .await;
    // Stopped, the proxy forwards nothing more; once it has closed every upstream connection,
    // the recording is complete.
    proxy.shutdown().await;
    eventually(Duration::from_secs(10), "the proxy's upstream connections close", || async {
        recording.open_connections() == 0
    })
    .await;
    let recorded = by_run(recording.events());

    let mut failures = Vec::new();
    let mut classes: BTreeMap<usize, Vec<(Path, String)>> = BTreeMap::new();
    for (n, got) in results.iter().enumerate() {
        let (index, path) = runs[n];
        let case = &cases[index];
        let id = run_id(index, path);
        let events = recorded.get(&id).map(Vec::as_slice).unwrap_or_default();
        let (fails, forwarded) = check_client(case, id, got, events);
        if got.prime_failed.is_none() {
            classes.entry(index).or_default().push((path, outcome_class(got, forwarded)));
        }
        for fail in fails {
            failures.push(format!(
                "{} [{path:?}] ({}) expected {:?}: {fail}; got {}",
                case.name,
                case.source,
                case.expect,
                got.show()
            ));
        }
    }
    for (index, by_path) in &classes {
        if let [(_, fast), (_, hyper)] = by_path.as_slice() {
            if fast != hyper {
                let case = &cases[*index];
                failures.push(format!(
                    "{} [both] ({}) expected the same outcome on both paths: fast path {fast}, hyper path {hyper}",
                    case.name, case.source
                ));
            }
        }
    }
    for event in recorded.get(&0).map(Vec::as_slice).unwrap_or_default() {
        failures.push(format!("[upstream] unattributed {:?}: {:?}", event.seen, raw::show(&event.raw, 120)));
    }
    println!(
        "client -> proxy: {} cases, {} runs, {:.1} s",
        cases.len(),
        runs.len(),
        started.elapsed().as_secs_f64()
    );
    for failure in &failures {
        println!("FAIL {failure}");
    }
    assert!(failures.is_empty(), "{} client -> proxy failures (listed above)", failures.len());
}

// ---------------------------------------------------------------------------------------------
// Upstream -> proxy
// ---------------------------------------------------------------------------------------------

/// A response an upstream slips in after its real answer: it must never reach a client.
const INJECTED: &[u8] = b"HTTP/1.1 200 OK\r\nX-Injected: 1\r\nContent-Length: 13\r\n\r\ninjected-body";
/// When the scripted upstream writes [`INJECTED`] after its answer.
const INJECT_AFTER: Duration = Duration::from_millis(300);

/// What the rules require of the proxy's answer to a scripted upstream response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UpExpect {
    /// R6, invalid head or status: 502 `upstream_invalid`, nothing of the answer relayed.
    Invalid,
    /// R6, invalid chunked body: 502 `upstream_invalid` if nothing was sent yet, else the
    /// response is cut and the connection closed (never completed).
    InvalidBody,
    /// The upstream closed early: a 502 of the proxy's, or a started response cut by a close.
    Failed,
    /// Relayed as a strictly framed response with this status and body.
    Relay(u16, &'static [u8]),
    /// The rules leave it open: a 502 of the proxy's or a strictly framed response (not a 101).
    Either,
    /// Refused by the fast path (502 `upstream_invalid`); the hyper path, whose decoder is
    /// hyper's, may relay this body re-framed instead (`src/proxy/LIFECYCLE.md`).
    StrictOnFast(&'static [u8]),
}

struct UpCase {
    name: &'static str,
    source: &'static str,
    answer: Vec<u8>,
    /// The upstream closes after the answer (else [`INJECTED`] follows after a pause).
    close: bool,
    expect: UpExpect,
}

fn up(name: &'static str, source: &'static str, answer: &[u8], expect: UpExpect) -> UpCase {
    UpCase { name, source, answer: answer.to_vec(), close: false, expect }
}

fn up_closing(name: &'static str, source: &'static str, answer: &[u8], expect: UpExpect) -> UpCase {
    UpCase { name, source, answer: answer.to_vec(), close: true, expect }
}

fn upstream_cases() -> Vec<UpCase> {
    use UpExpect::{Either, Failed, Invalid, InvalidBody, Relay, StrictOnFast};
    let ok: &'static [u8] = b"ok";
    let chunked =
        |body: &[u8]| [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".as_slice(), body].concat();
    let with_fields = |fields: &[u8]| {
        [b"HTTP/1.1 200 OK\r\n".as_slice(), fields, b"\r\nContent-Length: 2\r\n\r\nok"].concat()
    };
    // CL + TE where a Content-Length reader takes the injected response as body.
    let cl_te = {
        let body = [b"2\r\nok\r\n0\r\n\r\n".as_slice(), INJECTED].concat();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
            body.len()
        );
        [head.as_bytes(), &body].concat()
    };
    let huge_head = [
        b"HTTP/1.1 200 OK\r\n".as_slice(),
        &b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"
            .repeat(2500),
        b"Content-Length: 2\r\n\r\nok",
    ]
    .concat();
    vec![
        // Status lines (R6: 100..=599).
        up("status/000", "HTTP Garden status 000", b"HTTP/1.1 000 X\r\nContent-Length: 2\r\n\r\nok", Invalid),
        up("status/099", "status below 100", b"HTTP/1.1 099 X\r\nContent-Length: 2\r\n\r\nok", Invalid),
        up("status/600", "status above 599", b"HTTP/1.1 600 X\r\nContent-Length: 2\r\n\r\nok", Invalid),
        up("status/999", "HTTP Garden status 999", b"HTTP/1.1 999 X\r\nContent-Length: 2\r\n\r\nok", Invalid),
        up("status/1000", "four-digit status", b"HTTP/1.1 1000 X\r\nContent-Length: 2\r\n\r\nok", Invalid),
        up("status/20", "two-digit status", b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok", Invalid),
        up("status/alpha", "non-digit status", b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok", Invalid),
        up("status/negative", "signed status", b"HTTP/1.1 -200 OK\r\nContent-Length: 2\r\n\r\nok", Invalid),
        up("status/no-reason-sp", "RFC 9112 §4 SP before reason", b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", Either),
        up("status/http2", "HTTP/2 status line on HTTP/1.1", b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\nok", Invalid),
        up("status/lowercase-http", "RFC 9112 §2.3 HTTP-name case", b"http/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", Invalid),
        up("status/garbage", "no status line", b"hello\r\n\r\n", Invalid),
        up("status/http10", "HTTP/1.0 response", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", Relay(200, ok)),
        // Interim responses (R6: 1xx other than 101 skipped).
        up(
            "1xx/100-then-200",
            "RFC 9110 §15.2 interim responses",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            Relay(200, ok),
        ),
        up(
            "1xx/103-then-200",
            "RFC 8297 early hints",
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            Relay(200, ok),
        ),
        up(
            "1xx/several",
            "RFC 9110 §15.2 several interim responses",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            Relay(200, ok),
        ),
        up(
            "1xx/101-to-plain",
            "101 to a request that asked for no upgrade",
            &[b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n".as_slice(), INJECTED]
                .concat(),
            Either,
        ),
        // Content-Length (R6).
        up("cl/dup-identical", "RFC 9110 §8.6 identical duplicates", &with_fields(b"Content-Length: 2"), Relay(200, ok)),
        up(
            "cl/dup-differing",
            "CL.CL response splitting",
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 15\r\n\r\nok".as_slice(), INJECTED].concat(),
            Invalid,
        ),
        up("cl/list-differing", "RFC 9110 §8.6 differing list", b"HTTP/1.1 200 OK\r\nContent-Length: 2, 4\r\n\r\nokok", Invalid),
        up("cl/list-same", "RFC 9110 §8.6 identical list", b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", Either),
        up("cl/plus", "hyper GHSA-f3pg-qwvg-p99c (+ prefix)", b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", Invalid),
        up("cl/minus", "negative Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok", Invalid),
        up("cl/hex", "HTTP Garden 0x Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok", Invalid),
        up("cl/empty", "empty Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\nok", Invalid),
        up(
            "cl/overflow",
            "HTTP Garden overflow (2^64 + 2)",
            b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551618\r\n\r\nok",
            Invalid,
        ),
        up(
            "cl/space-before-colon",
            "smuggler space1 on a response",
            b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
            Invalid,
        ),
        // Transfer-Encoding (R6: exactly `chunked`; Content-Length dropped with it).
        up("te/cl-te", "CL.TE response splitting", &cl_te, Relay(200, ok)),
        up(
            "te/chunked-chunked",
            "RFC 9112 §6.1 chunked twice",
            &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n".as_slice(), b"2\r\nok\r\n0\r\n\r\n"].concat(),
            Invalid,
        ),
        up(
            "te/dup-lines",
            "http-request-smuggler dualchunk",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            Invalid,
        ),
        up("te/gzip", "final coding not chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok", Invalid),
        up(
            "te/gzip-chunked",
            "coding list",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            Invalid,
        ),
        up("te/identity", "RFC 7230 identity", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nok", Invalid),
        up("te/xchunked", "smuggler xchunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\nok", Invalid),
        up("te/quoted", "smuggler quoted", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \"chunked\"\r\n\r\nok", Invalid),
        up("te/empty", "smuggler empty value", b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\nContent-Length: 2\r\n\r\nok", Invalid),
        up(
            "te/vertprefix",
            "smuggler vertprefix1",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\x0bchunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            Invalid,
        ),
        up(
            "te/space-before-colon",
            "smuggler space1",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding : chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            Invalid,
        ),
        up(
            "te/uppercase",
            "coding names are case-insensitive",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: CHUNKED\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            Either,
        ),
        // Chunked bodies (R6: strictly RFC 9112 §7.1).
        up("chunk/ext-valid", "RFC 9112 §7.1.1", &chunked(b"2;a=b\r\nok\r\n0\r\n\r\n"), Relay(200, ok)),
        up("chunk/ext-quoted", "RFC 9112 §7.1.1", &chunked(b"2;a=\"x;y\"\r\nok\r\n0;z\r\n\r\n"), Relay(200, ok)),
        up("chunk/trailer-valid", "RFC 9112 §7.1.2", &chunked(b"2\r\nok\r\n0\r\nX-T: 1\r\n\r\n"), Relay(200, ok)),
        up("chunk/ext-bare-lf", "funky chunks TERM.EXT", &chunked(b"2;a\nok\r\n0\r\n\r\n"), InvalidBody),
        // Control bytes in an extension: both paths read past them as hyper does (only a bare LF
        // is refused) and drop the extension; they never reach the client.
        up("chunk/ext-ctl", "Http11Probe CHUNK-EXT-CTRL", &chunked(b"2;a=\x01\r\nok\r\n0\r\n\r\n"), Relay(200, ok)),
        up("chunk/ext-nul", "Http11Probe CHUNK-EXT-CTRL", &chunked(b"2;\x00a\r\nok\r\n0\r\n\r\n"), Relay(200, ok)),
        up("chunk/ext-del", "control byte in extension", &chunked(b"2;a=\x7f\r\nok\r\n0\r\n\r\n"), Relay(200, ok)),
        up("chunk/size-bare-lf", "funky chunks bare LF after size", &chunked(b"2\nok\r\n0\r\n\r\n"), InvalidBody),
        up("chunk/data-bare-lf", "funky chunks bare LF after data", &chunked(b"2\r\nok\n0\r\n\r\n"), InvalidBody),
        up("chunk/last-bare-lf", "funky chunks bare LF after last-chunk", &chunked(b"2\r\nok\r\n0\n\r\n"), InvalidBody),
        // A bare LF in the trailer section: the fast path refuses it; hyper's decoder reads it as
        // a line end and the hyper path relays the data re-framed, trailers dropped.
        up("chunk/final-bare-lf", "funky chunks TRAIL.TERM", &chunked(b"2\r\nok\r\n0\r\n\n"), StrictOnFast(ok)),
        up("chunk/trailer-bare-lf", "funky chunks bare LF in trailer", &chunked(b"2\r\nok\r\n0\r\nX-T: 1\n\r\n"), StrictOnFast(ok)),
        up("chunk/trailer-no-colon", "trailer not `name: value`", &chunked(b"2\r\nok\r\n0\r\nbad\r\n\r\n"), InvalidBody),
        up("chunk/trailer-fold", "obs-fold in trailer", &chunked(b"2\r\nok\r\n0\r\nX-T: 1\r\n 2\r\n\r\n"), InvalidBody),
        up("chunk/trailer-space-colon", "space before colon in trailer", &chunked(b"2\r\nok\r\n0\r\nX-T : 1\r\n\r\n"), InvalidBody),
        up("chunk/size-0x", "HTTP Garden 0x chunk size", &chunked(b"0x2\r\nok\r\n0\r\n\r\n"), InvalidBody),
        up("chunk/size-plus", "HTTP Garden signed chunk size", &chunked(b"+2\r\nok\r\n0\r\n\r\n"), InvalidBody),
        up("chunk/size-leading-space", "HTTP Garden leading space", &chunked(b" 2\r\nok\r\n0\r\n\r\n"), InvalidBody),
        // Blanks after the size: tolerated by both paths, as hyper does (RFC 9112 §7.1.1 BWS).
        up("chunk/size-trailing-space", "RFC 9112 §7.1 chunk-size", &chunked(b"2 \r\nok\r\n0\r\n\r\n"), Relay(200, ok)),
        up("chunk/size-overflow", "HTTP Garden chunk-size overflow", &chunked(b"10000000000000002\r\nok\r\n0\r\n\r\n"), InvalidBody),
        up("chunk/data-too-long", "funky chunks oversized data", &chunked(b"1\r\nok\r\n0\r\n\r\n"), InvalidBody),
        up("chunk/data-no-crlf", "funky chunks missing CRLF", &chunked(b"2\r\nokXX0\r\n\r\n"), InvalidBody),
        // Response heads (R6: invalid head -> 502).
        up("head/obs-fold", "obs-fold", &with_fields(b"X-A: 1\r\n 2"), Invalid),
        up("head/space-before-colon", "whitespace before colon", &with_fields(b"X-A : 1"), Invalid),
        up("head/name-slash", "non-token field name", &with_fields(b"X/A: 1"), Invalid),
        up("head/name-space", "space in field name", &with_fields(b"X A: 1"), Invalid),
        up("head/name-empty", "empty field name", &with_fields(b": 1"), Invalid),
        up("head/name-nul", "HTTP Garden NUL in name", &with_fields(b"X\x00A: 1"), Invalid),
        up("head/name-utf8", "non-ASCII field name", &with_fields(b"X\xc3\xa9: 1"), Invalid),
        up("head/no-colon", "field line without colon", &with_fields(b"XA"), Invalid),
        up("head/value-nul", "HTTP Garden NUL in value", &with_fields(b"X-A: a\x00b"), Either),
        up("head/value-ctl", "control byte in value", &with_fields(b"X-A: a\x01b"), Either),
        up("head/bare-cr", "RFC 9112 §2.2 bare CR", b"HTTP/1.1 200 OK\rContent-Length: 2\r\n\r\nok", Invalid),
        up("head/bare-lf", "RFC 9112 §2.2 bare LF (MAY)", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", Either),
        up("head/huge", "response head of ~215 KB, 2500 fields", &huge_head, Either),
        // Bytes after the response (R6: the upstream connection is never reused).
        up(
            "split/after-cl",
            "response splitting, bytes after a Content-Length body",
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".as_slice(), INJECTED].concat(),
            Relay(200, ok),
        ),
        up(
            "split/after-chunked",
            "response splitting, bytes after a chunked body",
            &[chunked(b"2\r\nok\r\n0\r\n\r\n").as_slice(), INJECTED].concat(),
            Relay(200, ok),
        ),
        up(
            "split/cl-zero",
            "response splitting, body past Content-Length 0",
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nok".as_slice(), INJECTED].concat(),
            Relay(200, b""),
        ),
        up(
            "split/204-with-body",
            "RFC 9110 §15.3.5 204 has no body",
            &[b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\nok".as_slice(), INJECTED].concat(),
            Relay(204, b""),
        ),
        up(
            "split/304-with-body",
            "RFC 9110 §15.4.5 304 has no body",
            &[b"HTTP/1.1 304 Not Modified\r\nContent-Length: 2\r\n\r\nok".as_slice(), INJECTED].concat(),
            Relay(304, b""),
        ),
        up("split/later", "response splitting, bytes later on an idle connection", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", Relay(200, ok)),
        // Early closes.
        up_closing("close/delimited", "RFC 9112 §6.3 body until close", b"HTTP/1.1 200 OK\r\n\r\nok", Relay(200, ok)),
        up_closing("close/truncated-cl", "truncated Content-Length body", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok", Failed),
        up_closing("close/truncated-chunked", "truncated chunked body", &chunked(b"5\r\nok"), Failed),
        up_closing("close/truncated-head", "truncated head", b"HTTP/1.1 200 OK\r\nContent-Len", Failed),
        up_closing("close/empty", "closed before any byte", b"", Failed),
    ]
}

/// What a client saw of one upstream case.
struct UpGot {
    first: Answer,
    /// The answer to the second request, when one was sent.
    second: Option<Answer>,
    interim: Vec<u16>,
    injected: bool,
    prime_failed: Option<String>,
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

/// `GET /first-N` (after a priming request on the hyper path), its answer (up to 600 ms), then,
/// unless the connection is closing, `GET /second-N` and its answer.
async fn exchange_upstream(addr: SocketAddr, id: usize, path: Path) -> UpGot {
    let mut conn = RawConn::connect(addr).await;
    let mut prime_failed = None;
    if path == Path::Hyper {
        conn.send(&fill(PRIME, id)).await;
        let answer = conn.next_answer(false, Instant::now() + READ_TIMEOUT).await;
        if !matches!(&answer, Answer::Response(r) if r.status == 200 && r.body_text() == text("clean /prime-####", id))
        {
            prime_failed = Some(show_answer(&answer));
        }
    }
    conn.send(&fill(b"GET /first-#### HTTP/1.1\r\nHost: a\r\n\r\n", id)).await;
    let first = conn.next_answer(false, Instant::now() + Duration::from_millis(600)).await;
    let open = match &first {
        Answer::Response(r) => !r.closes(),
        Answer::Timeout(pending) => pending.is_empty(),
        _ => false,
    };
    let second = if open && !conn.is_closed() {
        conn.send(&fill(b"GET /second-#### HTTP/1.1\r\nHost: a\r\n\r\n", id)).await;
        Some(conn.next_answer(false, Instant::now() + READ_TIMEOUT).await)
    } else {
        None
    };
    UpGot {
        first,
        second,
        interim: conn.interim.clone(),
        injected: contains_ignore_case(&conn.received, b"x-injected")
            || contains_ignore_case(&conn.received, b"injected-body"),
        prime_failed,
    }
}

fn check_upstream(case: &UpCase, id: usize, path: Path, got: &UpGot) -> Vec<String> {
    let mut fails = Vec::new();
    if let Some(why) = &got.prime_failed {
        fails.push(format!("priming request failed: {why}"));
        return fails;
    }
    if got.injected {
        fails.push("the injected response (X-Injected) reached the client".to_owned());
    }
    if !got.interim.is_empty() {
        fails.push(format!("interim responses {:?} were relayed (R6: 1xx skipped)", got.interim));
    }
    let proxy_error = |r: &raw::Response| r.header("x-rollout-error");
    let expect = match (case.expect, path) {
        (UpExpect::StrictOnFast(_), Path::Fast) => UpExpect::InvalidBody,
        (UpExpect::StrictOnFast(body), Path::Hyper) => UpExpect::Relay(200, body),
        (expect, _) => expect,
    };
    match (&got.first, expect) {
        (Answer::Response(r), UpExpect::Invalid | UpExpect::InvalidBody) => {
            if r.status != 502 || proxy_error(r).as_deref() != Some("upstream_invalid") {
                fails.push(format!("expected 502 upstream_invalid, got {}", show_response(r)));
            }
        }
        (Answer::Response(r), UpExpect::Failed) => {
            if r.status != 502 || proxy_error(r).is_none() {
                fails.push(format!("expected a 502 of the proxy's, got {}", show_response(r)));
            }
        }
        (Answer::Response(r), UpExpect::Relay(status, body)) => {
            if r.status != status || r.body != body || proxy_error(r).is_some() {
                fails.push(format!(
                    "expected {status} {:?} relayed, got {}",
                    raw::show(body, 40),
                    show_response(r)
                ));
            }
            if let raw::Framing::Chunked(c) = &r.framing {
                if c.extensions || !c.trailers.is_empty() {
                    fails.push("chunk extensions or trailer fields were relayed".to_owned());
                }
            }
        }
        (Answer::Response(r), UpExpect::Either) => {
            if r.status == 101 {
                fails.push("a 101 was relayed to a request that asked for no upgrade".to_owned());
            }
            if proxy_error(r).is_some() && r.status != 502 {
                fails.push(format!("expected a relayed response or a 502, got {}", show_response(r)));
            }
        }
        (Answer::Cut(_), UpExpect::InvalidBody | UpExpect::Failed) => {}
        // hyper's client hands the head over before reading the body; when the body turns out
        // malformed before any byte was written, the client connection closes with nothing.
        (Answer::Closed, UpExpect::InvalidBody | UpExpect::Failed) if path == Path::Hyper => {}
        (other, _) => fails.push(format!("first answer: {}", show_answer(other))),
    }
    match &got.second {
        None | Some(Answer::Closed) => {}
        Some(Answer::Response(r)) if r.status == 200 && r.body_text() == text("clean /second-####", id) => {}
        Some(other) => fails.push(format!("second answer: {}", show_answer(other))),
    }
    fails
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_to_proxy_corpus() {
    let started = std::time::Instant::now();
    let cases = Arc::new(upstream_cases());
    let mut scripts = std::collections::HashMap::new();
    for (index, case) in cases.iter().enumerate() {
        for path in PATHS {
            let later = (!case.close).then(|| (INJECT_AFTER, INJECTED.to_vec()));
            let script = raw::Script { answer: case.answer.clone(), later, close: case.close };
            scripts.insert(text("/first-####", run_id(index, path)), script);
        }
    }
    let (upstream, late_pending) =
        raw::spawn_scripted_upstream(move |target| scripts.get(target).cloned()).await;
    let config = corpus_config(upstream, upstream).upstream_settings(UpstreamSettings {
        response_timeout: Some(Duration::from_secs(1)),
        ..UpstreamSettings::default()
    });
    let proxy = ProxyBuilder::new(&config).spawn().await;
    let addr = proxy.addr;
    let runs: Arc<Vec<(usize, Path)>> =
        Arc::new((0..cases.len()).flat_map(|i| PATHS.map(|p| (i, p))).collect());

    let jobs = runs.clone();
    let results = run_all(runs.len(), move |n| {
        let (index, path) = jobs[n];
        exchange_upstream(addr, run_id(index, path), path)
    })
    .await;

    let mut failures = Vec::new();
    for (n, got) in results.iter().enumerate() {
        let (index, path) = runs[n];
        let case = &cases[index];
        for fail in check_upstream(case, run_id(index, path), path, got) {
            failures.push(format!(
                "{} [{path:?}] ({}) expected {:?}: {fail}",
                case.name, case.source, case.expect
            ));
        }
    }

    // Upstream connections the proxy kept: once the late injections have landed, requests that
    // may reuse them must get their own answers.
    eventually(Duration::from_secs(5), "the upstream's late injections are written", || async {
        late_pending.load(Ordering::SeqCst) == 0
    })
    .await;
    let sweep = run_all(2 * CONCURRENCY, move |n| async move {
        let mut conn = RawConn::connect(addr).await;
        let mut seen = Vec::new();
        for round in 0..4 {
            let target = format!("/sweep-{n}-{round}");
            conn.send(format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes()).await;
            let answer = conn.next_answer(false, Instant::now() + READ_TIMEOUT).await;
            match answer {
                Answer::Response(r) if r.status == 200 && r.body_text() == format!("clean {target}") => {}
                other => seen.push(format!("{target}: {}", show_answer(&other))),
            }
        }
        if contains_ignore_case(&conn.received, b"x-injected") {
            seen.push("the injected response reached the client".to_owned());
        }
        seen
    })
    .await;
    for fail in sweep.into_iter().flatten() {
        failures.push(format!("[sweep after the corpus]: {fail}"));
    }

    println!(
        "upstream -> proxy: {} cases, {} runs, {:.1} s",
        cases.len(),
        runs.len(),
        started.elapsed().as_secs_f64()
    );
    for failure in &failures {
        println!("FAIL {failure}");
    }
    drop(proxy);
    assert!(failures.is_empty(), "{} upstream -> proxy failures (listed above)", failures.len());
}
