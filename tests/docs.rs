//! Keeps the documentation true: every hex dump in `docs/core-bus.md` is
//! checked byte by byte, its tables of error codes and limits against the
//! code, and every relative link in `README.md` and `docs/*.md` must
//! resolve to a file of the repository.
//!
//! A hex dump is a fenced block with the info string `hex`. Its first line
//! names it: `# frame ID` or `# object ID` (a colon and a description may
//! follow). Every other line is bytes, two hex digits each, separated by
//! spaces, then an annotation; a line of bytes without an annotation
//! continues the element of the line above, and a line starting with `#` is
//! a comment. Each element has a line of its own — a prelude field, a
//! header's name, a header's value, an object (a list or map: its tag and
//! count alone), a map key, a CRC — and its annotation starts with what
//! [`decode_frame`] calls it: `total_len = 99`, `headers_len = 27`,
//! `prelude CRC`, `name "method"`, `string "publish"`, `int32 1 = call`,
//! `map, 3 entries`, `key "topic"`, `buffer "a/b"`, `i64 1`, `message CRC`
//! (anything after that, following a space, a comma or a colon, is free).
//!
//! For each dump: it decodes with the independent decoder below (its own
//! bitwise CRC-32) and with the crate's `bus::frame` and `bus::object`; each
//! line holds exactly one element and names it; and the bytes are exactly
//! what the crate's encoders write for that ID ([`expected`]: the daemon's
//! own answer encoders for answers and messages). The requests the document
//! shows are handed to the daemon's request handler (`service::handle`),
//! and its answers must be the answers the document shows.
//!
//! `cargo test --test docs -- --ignored --nocapture print_dumps` prints
//! every dump in this form, ready to paste.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use iotcored::bus::frame::{self, ErrorCode, RequestType, Response};
use iotcored::bus::object::{self, Encoder, Object};
use iotcored::bus::{example, server};
use iotcored::mqtt::packet::{QoS, Version};
use iotcored::mqtt::props::{id, Builder};
use iotcored::mqtt::session::Limits;
use iotcored::mqtt::topic;
use iotcored::router::{self, Router};
use iotcored::service::{self, answer, params, Caller, Context, Counters, LinkState, Mode};
use iotcored::spool::Spool;
use iotcored::time::Instant;

const DOC: &str = "docs/core-bus.md";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// ---- the dumps in the document ---------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Frame,
    Object,
}

/// One element as the document writes it: its bytes and its annotation.
#[derive(Debug)]
struct Row {
    bytes: Vec<u8>,
    note: String,
    line: usize,
}

#[derive(Debug)]
struct Dump {
    kind: Kind,
    id: String,
    line: usize,
    rows: Vec<Row>,
}

impl Dump {
    fn bytes(&self) -> Vec<u8> {
        self.rows.iter().flat_map(|r| r.bytes.clone()).collect()
    }
}

/// Splits a dump line into its bytes and its annotation.
fn split_row(text: &str) -> (Vec<u8>, String) {
    let mut bytes = Vec::new();
    let mut rest = text.trim();
    loop {
        let word_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let word = &rest[..word_end];
        if word.len() != 2 || !word.bytes().all(|b| b.is_ascii_hexdigit()) {
            break;
        }
        bytes.push(u8::from_str_radix(word, 16).unwrap());
        rest = rest[word_end..].trim_start();
    }
    (bytes, rest.trim().to_string())
}

/// Every ```hex block of `md`, in order.
fn dumps(md: &str) -> Vec<Dump> {
    let mut out: Vec<Dump> = Vec::new();
    let mut fence: Option<bool> = None; // Some(is_hex) inside a fence
    for (i, line) in md.lines().enumerate() {
        let n = i + 1;
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") {
            fence = match fence {
                Some(_) => None,
                None => Some(trimmed.trim_start_matches('`').trim() == "hex"),
            };
            if fence == Some(true) {
                out.push(Dump {
                    kind: Kind::Frame,
                    id: String::new(),
                    line: n,
                    rows: Vec::new(),
                });
            }
            continue;
        }
        if fence != Some(true) {
            continue;
        }
        let dump = out.last_mut().unwrap();
        if dump.id.is_empty() {
            let head = trimmed.strip_prefix('#').unwrap_or_else(|| {
                panic!("{DOC}:{n}: a hex dump starts with `# frame ID` or `# object ID`")
            });
            let head = head.split(':').next().unwrap().trim();
            let (kind, id) = head.split_once(' ').unwrap_or((head, ""));
            dump.kind = match kind {
                "frame" => Kind::Frame,
                "object" => Kind::Object,
                _ => panic!("{DOC}:{n}: `{kind}`: a dump is a `frame` or an `object`"),
            };
            assert!(!id.trim().is_empty(), "{DOC}:{n}: the dump has no ID");
            dump.id = id.trim().to_string();
            continue;
        }
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (bytes, note) = split_row(trimmed);
        assert!(
            !bytes.is_empty(),
            "{DOC}:{n}: a dump line without bytes: {line:?}"
        );
        if note.is_empty() {
            let last = dump.rows.last_mut().unwrap_or_else(|| {
                panic!("{DOC}:{n}: the first line of a dump needs an annotation")
            });
            last.bytes.extend(bytes);
        } else {
            dump.rows.push(Row {
                bytes,
                note,
                line: n,
            });
        }
    }
    assert_eq!(fence, None, "{DOC}: a fenced block is not closed");
    out
}

fn doc_dumps() -> BTreeMap<String, Dump> {
    let mut map = BTreeMap::new();
    for d in dumps(&read(DOC)) {
        let (id, line) = (d.id.clone(), d.line);
        if let Some(old) = map.insert(id.clone(), d) {
            panic!(
                "{DOC}:{line}: dump `{id}` again (first at line {})",
                old.line
            );
        }
    }
    map
}

// ---- an independent decoder ----------------------------------------------------------

/// CRC-32 (IEEE, reflected 0xEDB88320), bit by bit.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// One element of an encoding and what it is called.
#[derive(Debug)]
struct Elem {
    bytes: Vec<u8>,
    name: String,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("runs out of bytes at offset {}", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().unwrap())
    }

    /// The bytes from `start` to here, as an element called `name`.
    fn elem(&self, start: usize, name: String) -> Elem {
        Elem {
            bytes: self.bytes[start..self.pos].to_vec(),
            name,
        }
    }
}

/// `"text"` for printable ASCII, else `0x` and the bytes in hex.
fn quote(b: &[u8]) -> String {
    if b.iter()
        .all(|&c| (0x20..0x7f).contains(&c) && c != b'"' && c != b'\\')
    {
        format!("\"{}\"", String::from_utf8_lossy(b))
    } else {
        format!(
            "0x{}",
            b.iter().map(|c| format!("{c:02x}")).collect::<String>()
        )
    }
}

fn plural(n: u32, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The elements of one object; `depth` counts the non-empty containers
/// around it (at most 14 in all [bus-obj-1]).
fn decode_object(c: &mut Cursor<'_>, depth: usize, out: &mut Vec<Elem>) -> Result<(), String> {
    let start = c.pos;
    let [tag] = c.array()?;
    match tag {
        0 => out.push(c.elem(start, "null".into())),
        1 => {
            let [v] = c.array()?;
            out.push(c.elem(start, format!("bool {}", v != 0)));
        }
        2 => {
            let v = i64::from_le_bytes(c.array()?);
            out.push(c.elem(start, format!("i64 {v}")));
        }
        3 => {
            let v = f64::from_le_bytes(c.array()?);
            out.push(c.elem(start, format!("f64 {v:?}")));
        }
        4 => {
            let len = u32::from_le_bytes(c.array()?);
            let v = c.take(usize::try_from(len).unwrap())?;
            out.push(c.elem(start, format!("buffer {}", quote(v))));
        }
        5 | 6 => {
            let count = u32::from_le_bytes(c.array()?);
            if count > 0 && depth >= 14 {
                return Err("nested more than 14 deep".into());
            }
            let name = if tag == 5 {
                format!("list, {}", plural(count, "item", "items"))
            } else {
                format!("map, {}", plural(count, "entry", "entries"))
            };
            out.push(c.elem(start, name));
            for _ in 0..count {
                if tag == 6 {
                    let key_start = c.pos;
                    let len = u32::from_le_bytes(c.array()?);
                    let key = c.take(usize::try_from(len).unwrap())?;
                    out.push(c.elem(key_start, format!("key {}", quote(key))));
                }
                decode_object(c, depth + 1, out)?;
            }
        }
        other => return Err(format!("unknown object tag {other}")),
    }
    Ok(())
}

/// What an int32 header's value means, for the `type` and `error` headers.
fn int_meaning(name: &[u8], v: i32) -> String {
    match (name, v) {
        (b"type", 0) => " = notify".into(),
        (b"type", 1) => " = call".into(),
        (b"type", 2) => " = subscribe".into(),
        (b"error", _) => match ErrorCode::from_i32(v) {
            Some(code) => format!(" = {}", code.name()),
            None => String::new(),
        },
        _ => String::new(),
    }
}

/// The elements of one whole frame, every check of [bus-frame-3] applied.
fn decode_frame(b: &[u8]) -> Result<Vec<Elem>, String> {
    if b.len() < 16 {
        return Err(format!("{} bytes: shorter than a frame", b.len()));
    }
    let be = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let (total, headers_len) = (
        usize::try_from(be(0)).unwrap(),
        usize::try_from(be(4)).unwrap(),
    );
    if crc32(&b[..8]) != be(8) {
        return Err(format!(
            "prelude CRC {:08x}, should be {:08x}",
            be(8),
            crc32(&b[..8])
        ));
    }
    if total != b.len() {
        return Err(format!("total_len {total}, but {} bytes", b.len()));
    }
    if headers_len > total - 16 {
        return Err(format!("headers_len {headers_len} > total_len - 16"));
    }
    let crc_at = total - 4;
    if crc32(&b[..crc_at]) != be(crc_at) {
        return Err(format!(
            "message CRC {:08x}, should be {:08x}",
            be(crc_at),
            crc32(&b[..crc_at])
        ));
    }
    let mut c = Cursor {
        bytes: &b[..crc_at],
        pos: 0,
    };
    let mut out = Vec::new();
    c.take(4)?;
    out.push(c.elem(0, format!("total_len = {total}")));
    c.take(4)?;
    out.push(c.elem(4, format!("headers_len = {headers_len}")));
    c.take(4)?;
    out.push(c.elem(8, "prelude CRC".into()));
    let headers_end = 12 + headers_len;
    while c.pos < headers_end {
        let start = c.pos;
        let [name_len] = c.array()?;
        let name = c.take(usize::from(name_len))?;
        out.push(c.elem(start, format!("name {}", quote(name))));
        let start = c.pos;
        let [kind] = c.array()?;
        match kind {
            4 => {
                let v = i32::from_be_bytes(c.array()?);
                out.push(c.elem(start, format!("int32 {v}{}", int_meaning(name, v))));
            }
            7 => {
                let len = u16::from_be_bytes(c.array()?);
                let s = c.take(usize::from(len))?;
                out.push(c.elem(start, format!("string {}", quote(s))));
            }
            other => return Err(format!("header value type {other}")),
        }
    }
    if c.pos != headers_end {
        return Err("the headers overrun headers_len".into());
    }
    if c.pos < crc_at {
        decode_object(&mut c, 0, &mut out)?;
        if c.pos != crc_at {
            return Err("bytes after the payload's object".into());
        }
    }
    out.push(Elem {
        bytes: b[crc_at..].to_vec(),
        name: "message CRC".into(),
    });
    Ok(out)
}

fn decode_whole_object(b: &[u8]) -> Result<Vec<Elem>, String> {
    let mut c = Cursor { bytes: b, pos: 0 };
    let mut out = Vec::new();
    decode_object(&mut c, 0, &mut out)?;
    if c.pos != b.len() {
        return Err("bytes after the object".into());
    }
    Ok(out)
}

/// Whether an annotation names the element: `name`, then nothing or a
/// space, comma, colon or semicolon and free text.
fn names(note: &str, name: &str) -> bool {
    note.strip_prefix(name)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', ',', ':', ';']))
}

// ---- what the crate writes ------------------------------------------------------------

/// A request frame for `method` whose params `params` writes (nothing: an
/// empty payload).
fn request(
    method: &str,
    kind: RequestType,
    params: impl FnOnce(&mut Encoder<'_>) -> Result<(), object::Error>,
) -> Vec<u8> {
    let mut payload = vec![0u8; 4096];
    let mut e = Encoder::new(&mut payload);
    params(&mut e).unwrap();
    let n = e.written();
    let mut buf = vec![0u8; frame::request_len(method.as_bytes(), n)];
    let mut em = frame::begin_request(&mut buf, method.as_bytes(), kind).unwrap();
    em.payload_mut()[..n].copy_from_slice(&payload[..n]);
    let len = em.finish(n).unwrap();
    assert_eq!(len, buf.len());
    buf
}

/// What one of the daemon's answer encoders writes.
fn answer_bytes(write: impl FnOnce(&mut [u8]) -> usize) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let n = write(&mut buf);
    assert!(n > 0, "the encoder wrote nothing");
    buf.truncate(n);
    buf
}

/// An object `write` encodes.
fn object_bytes(write: impl FnOnce(&mut Encoder<'_>) -> Result<(), object::Error>) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut e = Encoder::new(&mut buf);
    write(&mut e).unwrap();
    let n = e.written();
    buf.truncate(n);
    buf
}

/// The MQTT 5 properties of the message in `subscribe-message-properties`.
fn message_properties() -> Builder<256> {
    let mut b = Builder::<256>::new();
    b.u32(id::MESSAGE_EXPIRY, 59).unwrap();
    b.string(id::CONTENT_TYPE, "text/plain").unwrap();
    b.pair("unit", "C").unwrap();
    b
}

/// The `publish` params of `params-publish-mqtt5`.
fn mqtt5_params(e: &mut Encoder<'_>) -> Result<(), object::Error> {
    e.map(8)?;
    e.key(b"topic")?.buf(b"a/b")?;
    e.key(b"payload")?.buf(b"hi")?;
    e.key(b"qos")?.i64(1)?;
    e.key(b"expiry")?.i64(60)?;
    e.key(b"user_properties")?.map(1)?.key(b"unit")?.buf(b"C")?;
    e.key(b"content_type")?.buf(b"text/plain")?;
    e.key(b"response_topic")?.buf(b"a/reply")?;
    e.key(b"correlation_data")?.buf(b"req-1")?;
    Ok(())
}

/// Every dump the document shows, as the crate encodes it.
fn expected(id: &str) -> Option<(Kind, Vec<u8>)> {
    let frame = |b: Vec<u8>| Some((Kind::Frame, b));
    match id {
        "publish-call" => {
            let built = request("publish", RequestType::Call, |e| {
                e.map(3)?.key(b"topic")?.buf(b"a/b")?;
                e.key(b"payload")?.buf(b"hi")?.key(b"qos")?.i64(1)?;
                Ok(())
            });
            assert_eq!(
                built,
                example::PUBLISH_CALL,
                "the worked example of the spec"
            );
            frame(built)
        }
        "publish-result" => frame(answer_bytes(answer::null)),
        "publish-wildcard-call" => frame(request("publish", RequestType::Call, |e| {
            e.map(1)?.key(b"topic")?.buf(b"a/+")?;
            Ok(())
        })),
        "error-invalid" => frame(answer_bytes(|b| answer::error(b, ErrorCode::Invalid))),
        "subscribe-call" => frame(request("subscribe", RequestType::Subscribe, |e| {
            e.map(1)?.key(b"topic_filter")?.buf(b"a/#")?;
            Ok(())
        })),
        "subscribe-accepted" => frame(answer_bytes(answer::accepted)),
        "subscribe-message" => frame(answer_bytes(|b| answer::message(b, "a/b", b"hi", None))),
        "subscribe-message-properties" => {
            let props = message_properties();
            frame(answer_bytes(|b| {
                answer::message(b, "a/b", b"hi", Some(&props.props()))
            }))
        }
        "status-call" => frame(request("connection_status", RequestType::Subscribe, |_| {
            Ok(())
        })),
        "status-true" => frame(answer_bytes(|b| answer::bool(b, true))),
        "endpoint-notify" => frame(answer_bytes(|b| answer::notify(b, "a/b", b"hi", None))),
        "object-every-type" => Some((
            Kind::Object,
            object_bytes(|e| {
                e.map(7)?;
                e.key(b"n")?.null()?;
                e.key(b"b")?.bool(true)?;
                e.key(b"i")?.i64(-2)?;
                e.key(b"f")?.f64(1.5)?;
                e.key(b"s")?.buf(b"xy")?;
                e.key(b"l")?.list(2)?.i64(1)?.buf(b"z")?;
                e.key(b"m")?.map(0)?;
                Ok(())
            }),
        )),
        "params-publish-mqtt5" => Some((Kind::Object, object_bytes(mqtt5_params))),
        _ => None,
    }
}

/// The IDs of [`expected`], in the order the document shows them.
const IDS: &[&str] = &[
    "object-every-type",
    "publish-call",
    "publish-result",
    "publish-wildcard-call",
    "error-invalid",
    "params-publish-mqtt5",
    "subscribe-call",
    "subscribe-accepted",
    "subscribe-message",
    "subscribe-message-properties",
    "endpoint-notify",
    "status-call",
    "status-true",
];

/// A dump as the document writes it: one element a line, long ones
/// continued on lines of 16 bytes.
fn render(kind: Kind, id: &str, bytes: &[u8]) -> String {
    let elems = match kind {
        Kind::Frame => decode_frame(bytes),
        Kind::Object => decode_whole_object(bytes),
    }
    .unwrap();
    let kind = if kind == Kind::Frame {
        "frame"
    } else {
        "object"
    };
    let mut s = format!("```hex\n# {kind} {id}\n");
    for e in elems {
        for (i, chunk) in e.bytes.chunks(16).enumerate() {
            let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            let hex = hex.join(" ");
            if i == 0 {
                s += &format!("{hex:<49}{}\n", e.name);
            } else {
                s += &format!("{hex}\n");
            }
        }
    }
    s + "```\n"
}

#[test]
#[ignore = "prints the dumps to paste into the document"]
fn print_dumps() {
    for id in IDS {
        let (kind, bytes) = expected(id).unwrap();
        println!("{}", render(kind, id, &bytes));
    }
}

// ---- the checks ----------------------------------------------------------------------

#[test]
fn the_crc_is_the_ieee_one_with_the_documented_check_value() {
    // [bus-frame-1]
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(iotcored::crc::crc32(b"123456789"), 0xCBF4_3926);
    assert!(read(DOC).contains("0xCBF43926"));
}

#[test]
fn every_dump_decodes_to_what_its_lines_say() {
    let all = doc_dumps();
    assert!(!all.is_empty(), "{DOC} has no hex dumps");
    for d in all.values() {
        let bytes = d.bytes();
        let elems = match d.kind {
            Kind::Frame => decode_frame(&bytes),
            Kind::Object => decode_whole_object(&bytes),
        }
        .unwrap_or_else(|e| panic!("{DOC}:{}: dump `{}`: {e}", d.line, d.id));
        for (row, elem) in d.rows.iter().zip(&elems) {
            assert_eq!(
                row.bytes, elem.bytes,
                "{DOC}:{}: `{}`: this line should hold exactly the bytes of `{}`",
                row.line, d.id, elem.name
            );
            assert!(
                names(&row.note, &elem.name),
                "{DOC}:{}: `{}`: the annotation should start with `{}`, not {:?}",
                row.line,
                d.id,
                elem.name,
                row.note
            );
        }
        assert_eq!(
            d.rows.len(),
            elems.len(),
            "{DOC}:{}: `{}`: one line per element",
            d.line,
            d.id
        );
        // And the crate's own decoders agree.
        match d.kind {
            Kind::Frame => {
                let f = frame::parse(&bytes).unwrap();
                assert_eq!(
                    frame::frame_len(&bytes, bytes.len()),
                    frame::FrameLen::Len(bytes.len())
                );
                if let Ok(r) = f.request() {
                    object::parse_params(r.payload).unwrap();
                } else if let Response::Payload(p) = f.response() {
                    Object::parse(p).unwrap();
                }
            }
            Kind::Object => {
                Object::parse(&bytes).unwrap();
            }
        }
    }
}

#[test]
fn every_dump_is_what_the_crate_encodes() {
    let all = doc_dumps();
    for d in all.values() {
        let Some((kind, bytes)) = expected(&d.id) else {
            panic!(
                "{DOC}:{}: dump `{}` is not one `expected` knows",
                d.line, d.id
            );
        };
        assert_eq!(d.kind, kind, "{DOC}:{}: `{}`", d.line, d.id);
        assert!(
            d.bytes() == bytes,
            "{DOC}:{}: `{}` differs from what the crate encodes:\n{}",
            d.line,
            d.id,
            render(kind, &d.id, &bytes)
        );
    }
    for id in IDS {
        assert!(all.contains_key(*id), "{DOC} lacks the dump `{id}`");
    }
}

/// The daemon's state as a request sees it: connected, nothing queued.
struct World {
    spool: Spool,
    router: Router,
    version: Version,
}

impl World {
    fn new() -> Self {
        Self {
            spool: Spool::new(64 * 1024, 64),
            router: Router::new(),
            version: Version::V5,
        }
    }

    /// Hands `bytes` to the request handler as slot 1; the reply and the
    /// answer bytes.
    fn handle(&mut self, bytes: &[u8]) -> (service::Reply, Vec<u8>) {
        let links = [LinkState {
            id: "gw",
            connected: true,
            last_disconnect: "",
        }];
        let mut ctx = Context {
            spool: &mut self.spool,
            router: &mut self.router,
            links: &links,
            counters: Counters::default(),
            now: Instant::default(),
            endpoint_reachable: &|_| true,
            store: None,
            version: self.version,
            broker: Limits::default(),
        };
        let caller = Caller {
            slot: 1,
            generation: 1,
            pid: &|| 4242,
        };
        let mut out = vec![0u8; 64 * 1024];
        let reply = service::handle(bytes, caller, &mut ctx, &mut out);
        out.truncate(reply.len);
        (reply, out)
    }
}

#[test]
fn the_daemon_answers_the_documented_requests_with_the_documented_answers() {
    let all = doc_dumps();
    let dump = |id: &str| {
        all.get(id)
            .unwrap_or_else(|| panic!("no dump `{id}`"))
            .bytes()
    };

    // publish: null once queued [iotcored-bus-publish-1].
    let mut w = World::new();
    let (reply, out) = w.handle(&dump("publish-call"));
    assert_eq!(out, dump("publish-result"));
    assert!(!reply.close && reply.mode == Mode::Requests);
    assert_eq!(w.spool.len(), 1);

    // A wildcard in a topic name: INVALID, the connection stays [bus-err-3].
    let (reply, out) = w.handle(&dump("publish-wildcard-call"));
    assert_eq!(out, dump("error-invalid"));
    assert!(!reply.close && reply.mode == Mode::Requests);
    assert_eq!(w.spool.len(), 1);

    // The MQTT 5 keys: read as documented, and the publish answered null.
    let params_bytes = dump("params-publish-mqtt5");
    let map = object::parse_params(&params_bytes).unwrap();
    let p = params::publish(&map).unwrap();
    assert_eq!(
        (p.topic, p.payload, p.qos),
        ("a/b", &b"hi"[..], QoS::AtLeastOnce)
    );
    assert_eq!(p.expiry, Some(60));
    assert_eq!(p.properties.content_type, Some("text/plain"));
    assert_eq!(p.properties.response_topic, Some("a/reply"));
    assert_eq!(p.properties.correlation_data, Some(&b"req-1"[..]));
    let user: Vec<_> = p.properties.user.unwrap().iter().collect();
    assert_eq!(user, [(&b"unit"[..], Object::Buf(b"C"))]);
    let mut in_frame = vec![0u8; frame::request_len(b"publish", params_bytes.len())];
    let mut em = frame::begin_request(&mut in_frame, b"publish", RequestType::Call).unwrap();
    em.payload_mut()[..params_bytes.len()].copy_from_slice(&params_bytes);
    em.finish(params_bytes.len()).unwrap();
    assert_eq!(w.handle(&in_frame).1, dump("publish-result"));

    // subscribe: no answer until the router settles it, then `accepted`.
    let (reply, out) = w.handle(&dump("subscribe-call"));
    assert!(out.is_empty());
    let Mode::AwaitStream(id) = reply.mode else {
        panic!("the subscribe does not wait for its SUBACK: {reply:?}");
    };
    assert!(reply.mode.ignores_input(), "[bus-req-4.2]");
    let settled = w.router.take_settled().expect("settled");
    assert_eq!(settled.id, id);
    let mut out = vec![0u8; 64];
    let reply = service::settled(&settled, Some((1, reply.mode)), &mut out).unwrap();
    out.truncate(reply.len);
    assert_eq!(out, dump("subscribe-accepted"));
    assert_eq!(reply.mode, Mode::Stream(id));

    // connection_status: `accepted`, then the state, in one write.
    let (reply, out) = World::new().handle(&dump("status-call"));
    let mut want = dump("subscribe-accepted");
    want.extend(dump("status-true"));
    assert_eq!(out, want);
    assert_eq!(reply.mode, Mode::Status);

    // The endpoint notify is a request an endpoint's server can parse.
    let notify = dump("endpoint-notify");
    let f = frame::parse(&notify).unwrap();
    let r = f.request().unwrap();
    assert_eq!(
        (r.method, r.kind),
        (&b"iotcored_response"[..], RequestType::Notify)
    );
}

// ---- tables ------------------------------------------------------------------------------

/// The tables of `md`: each a list of rows of cells, without backticks.
fn tables(md: &str) -> Vec<Vec<Vec<String>>> {
    let mut out: Vec<Vec<Vec<String>>> = Vec::new();
    let mut in_table = false;
    for line in md.lines() {
        if !line.trim_start().starts_with('|') {
            in_table = false;
            continue;
        }
        if !in_table {
            out.push(Vec::new());
            in_table = true;
        }
        let cells = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().replace('`', ""))
            .collect();
        out.last_mut().unwrap().push(cells);
    }
    out
}

#[test]
fn the_error_code_table_is_the_code_s() {
    let all = tables(&read(DOC));
    let table = all
        .iter()
        .find(|t| t[0].len() > 2 && t[0][0] == "code" && t[0][1] == "name")
        .expect("a table headed `code | name`");
    let mut seen = Vec::new();
    for row in &table[2..] {
        let num: i32 = row[0]
            .parse()
            .unwrap_or_else(|_| panic!("code {:?}", row[0]));
        let code = ErrorCode::from_i32(num).unwrap_or_else(|| panic!("no error code {num}"));
        assert_eq!(code.name(), row[1], "error code {num}");
        seen.push(num);
    }
    assert_eq!(seen, (1..=18).collect::<Vec<_>>(), "every code, in order");
}

#[test]
fn the_limits_table_is_the_code_s() {
    let secs = |d: core::time::Duration| usize::try_from(d.as_secs()).unwrap();
    let limits: &[(&str, usize)] = &[
        ("PRELUDE_LEN", frame::PRELUDE_LEN),
        ("MIN_FRAME_LEN", frame::MIN_FRAME_LEN),
        ("GGL_MAX_FRAME_LEN", frame::GGL_MAX_FRAME_LEN),
        ("MAX_DEPTH", object::MAX_DEPTH),
        (
            "MAX_INTERFACE_NAME_LEN",
            iotcored::bus::MAX_INTERFACE_NAME_LEN,
        ),
        ("MAX_PAYLOAD", params::MAX_PAYLOAD),
        ("MAX_USER_PROPERTIES", params::MAX_USER_PROPERTIES),
        ("MAX_TOPIC_LEN", topic::MAX_TOPIC_LEN),
        ("MAX_SLASHES", topic::MAX_SLASHES),
        ("MAX_FILTERS_PER_REQUEST", router::MAX_FILTERS_PER_REQUEST),
        ("DISCARD_TIMEOUT", secs(server::DISCARD_TIMEOUT)),
        ("CLOSE_LINGER", secs(server::CLOSE_LINGER)),
        ("PARTIAL_TIMEOUT", secs(server::PARTIAL_TIMEOUT)),
        ("STALL_TIMEOUT", secs(server::STALL_TIMEOUT)),
        ("ENDPOINT_TIMEOUT", secs(router::ENDPOINT_TIMEOUT)),
    ];
    let rows: Vec<Vec<String>> = tables(&read(DOC)).into_iter().flatten().collect();
    for &(name, value) in limits {
        let mut found = 0;
        for row in rows.iter().filter(|r| r[0] == name) {
            let cell = row.get(1).map(String::as_str).unwrap_or("");
            let number = cell.split_whitespace().next().unwrap_or("");
            assert_eq!(
                number.parse::<usize>().ok(),
                Some(value),
                "{DOC}: `{name}` is {cell:?}"
            );
            found += 1;
        }
        assert!(found > 0, "{DOC}: no table row for `{name}`");
    }
}

// ---- links --------------------------------------------------------------------------------

/// GitHub's anchor of a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown file's headings (duplicates numbered).
fn anchors(md: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut fenced = false;
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if fenced {
            continue;
        }
        if let Some(h) = line.strip_prefix('#') {
            let base = slug(h.trim_start_matches('#'));
            let n = out
                .iter()
                .filter(|a| {
                    **a == base
                        || a.strip_prefix(&format!("{base}-"))
                            .is_some_and(|s| s.parse::<u32>().is_ok())
                })
                .count();
            out.push(if n == 0 { base } else { format!("{base}-{n}") });
        }
    }
    out
}

/// Every link target of a Markdown file, with its line: inline links and
/// images `[text](target)`, reference definitions `[label]: target`, and a
/// path to a Markdown file written as code (`` `spec/core-bus.md` ``): a
/// mention of another document is a link for its reader. Fenced blocks are
/// skipped.
fn links(md: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (i, line) in md.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Code spans: kept aside, and blanked out of the line.
        let mut text = String::new();
        let mut rest = line;
        while let Some(open) = rest.find('`') {
            text += &rest[..open];
            let ticks = rest[open..].len() - rest[open..].trim_start_matches('`').len();
            let fence = "`".repeat(ticks);
            let body_start = open + ticks;
            match rest[body_start..].find(&fence) {
                Some(close) => {
                    let code = rest[body_start..body_start + close].trim();
                    let is_path = code.ends_with(".md")
                        && !code.starts_with('/')
                        && code
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
                    if is_path {
                        out.push((i + 1, code.to_string()));
                    }
                    text += "CODE";
                    rest = &rest[body_start + close + ticks..];
                }
                None => {
                    text += &rest[open..];
                    rest = "";
                }
            }
        }
        text += rest;
        // Reference definitions.
        let t = text.trim_start();
        if t.starts_with('[') {
            if let Some(end) = t.find("]:") {
                let target = t[end + 2..].split_whitespace().next().unwrap_or("");
                out.push((i + 1, target.trim_matches(['<', '>']).to_string()));
                continue;
            }
        }
        // Inline links.
        let mut s = text.as_str();
        while let Some(at) = s.find("](") {
            let after = &s[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            let target = after[..end].split_whitespace().next().unwrap_or("");
            out.push((i + 1, target.trim_matches(['<', '>']).to_string()));
            s = &after[end..];
        }
    }
    out
}

/// The relative links of `rel` (a Markdown file of the repository) that do
/// not resolve, as `file:line: target (why)`.
fn broken_links(rel: &str) -> Vec<String> {
    let md = read(rel);
    let dir = root().join(rel).parent().unwrap().to_path_buf();
    let mut broken = Vec::new();
    for (line, target) in links(&md) {
        if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = match target.split_once('#') {
            Some((p, a)) => (p, Some(a)),
            None => (target.as_str(), None),
        };
        let file = if path.is_empty() {
            root().join(rel)
        } else if Path::new(path).is_absolute() {
            broken.push(format!(
                "{rel}:{line}: {target} (absolute, not in the repository)"
            ));
            continue;
        } else {
            dir.join(path)
        };
        if !file.exists() {
            broken.push(format!("{rel}:{line}: {target} (no such file)"));
            continue;
        }
        if let Some(anchor) = anchor.filter(|_| file.extension().is_some_and(|e| e == "md")) {
            let text = fs::read_to_string(&file).unwrap();
            if !anchors(&text).iter().any(|a| a == anchor) {
                broken.push(format!("{rel}:{line}: {target} (no such heading)"));
            }
        }
    }
    broken
}

#[test]
fn relative_links_in_the_docs_resolve() {
    let mut files: Vec<String> = fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    files.sort();
    assert!(files.iter().any(|f| f == DOC));
    let broken: Vec<String> = files.iter().flat_map(|f| broken_links(f)).collect();
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    // The document links to the code it describes.
    assert!(links(&read(DOC)).len() > 5);
}

#[test]
fn relative_links_in_the_readme_resolve() {
    let broken = broken_links("README.md");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_link_finder_sees_links_mentions_and_anchors() {
    let md = "See [a](x/a.md#top) and ![i](i.png \"t\"), `spec/b.md` and `not a path.md`.\n\
              ```\n[no](fenced.md)\n```\n[ref]: <r.md>\n`[no](code.md)` [web](https://x.org)\n";
    let got: Vec<String> = links(md).into_iter().map(|(_, t)| t).collect();
    assert_eq!(
        got,
        ["spec/b.md", "x/a.md#top", "i.png", "r.md", "https://x.org"]
    );
    let heads = anchors("# 2. Framing\n## `publish`\n## Publish\n## publish\n```\n# no\n```\n");
    assert_eq!(heads, ["2-framing", "publish", "publish-1", "publish-2"]);
}
