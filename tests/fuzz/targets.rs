//! The targets: what each decoder must do with any input.

use std::io;
use std::time::Duration;

use iotcored::bus::frame::{self, FrameLen, RequestType};
use iotcored::bus::object::{self, Encoder, Object};
use iotcored::crc::crc32;
use iotcored::journal::{self, Journal, Read, Storage};
use iotcored::mqtt::packet::{packet_len, Packet, Version};
use iotcored::mqtt::props::{Context, Props};
use iotcored::mqtt::session::{connect_packet, Session};
use iotcored::service::params::{self, Method};
use iotcored::time::Instant;

use crate::corpus;
use crate::mutate::Rng;
use crate::Target;

pub fn all() -> Vec<Target> {
    vec![
        bus_frame(),
        bus_object(),
        mqtt_packet(Version::V311, "mqtt311_packet"),
        mqtt_packet(Version::V5, "mqtt5_packet"),
        mqtt5_props(),
        session(Version::V311, "mqtt311_session"),
        session(Version::V5, "mqtt5_session"),
        spool_record(),
        spool_journal(),
    ]
}

// --- bus frames ------------------------------------------------------------

/// The largest frame the daemon's framer takes (IOTCORED_BUS_MAX_FRAME).
const MAX_FRAME: usize = 147_456;

fn bus_frame() -> Target {
    let mut scratch = vec![0u8; 1 << 17];
    Target {
        name: "bus_frame",
        corpus: corpus::bus_frames(),
        run: Box::new(move |input| {
            // The framer first, as the server runs it.
            match frame::frame_len(input, MAX_FRAME) {
                FrameLen::Invalid(_) | FrameLen::Oversized { .. } | FrameLen::NeedPrelude => {
                    return Ok(false)
                }
                _ => {}
            }
            let Ok(f) = frame::parse(input) else {
                return Ok(false);
            };
            // Byte for byte: the emitter writes what the parser read.
            let n = f
                .emit(&mut scratch)
                .map_err(|e| format!("emit of a parsed frame: {e}"))?;
            if scratch[..n] != *input {
                return Err("emit(parse(x)) != x".into());
            }
            let _ = f.response();
            let _ = f.headers().count();
            if let Ok(req) = f.request() {
                params_of(req.method, req.kind, req.payload);
            }
            Ok(true)
        }),
        fixup: Some(fix_frame),
        slow: false,
    }
}

/// What the service does with a request's parameters.
fn params_of(method: &[u8], _kind: RequestType, payload: &[u8]) {
    let Ok(map) = object::parse_params(payload) else {
        return;
    };
    match Method::from_name(method) {
        Some(Method::Publish) => {
            let _ = params::publish(&map);
        }
        Some(Method::Subscribe) => {
            let _ = params::subscribe(&map);
        }
        Some(Method::Unsubscribe) => {
            let _ = params::unsubscribe(&map);
        }
        _ => {}
    }
}

/// Makes the prelude's lengths and both CRCs right again.
#[allow(clippy::ptr_arg)] // the fixup signature: others change the length
fn fix_frame(buf: &mut Vec<u8>, rng: &mut Rng) {
    if buf.len() < 16 {
        return;
    }
    let len = buf.len() as u32;
    buf[0..4].copy_from_slice(&len.to_be_bytes());
    if rng.below(4) == 0 {
        // Headers length somewhere in the frame.
        let h = rng.below(buf.len() - 15) as u32;
        buf[4..8].copy_from_slice(&h.to_be_bytes());
    }
    let crc = crc32(&buf[0..8]);
    buf[8..12].copy_from_slice(&crc.to_be_bytes());
    let end = buf.len() - 4;
    let crc = crc32(&buf[..end]);
    buf[end..].copy_from_slice(&crc.to_be_bytes());
}

// --- bus objects -------------------------------------------------------------

fn bus_object() -> Target {
    let mut first = vec![0u8; 1 << 17];
    let mut second = vec![0u8; 1 << 17];
    Target {
        name: "bus_object",
        corpus: corpus::bus_objects(),
        run: Box::new(move |input| {
            let Ok(obj) = Object::parse(input) else {
                return Ok(false);
            };
            walk(&obj, 0);
            // Canonical: encoding what was parsed, then parsing and
            // encoding that, gives the same bytes (a bool becomes 0 or 1).
            let n = encode(&obj, &mut first)?;
            let again = Object::parse(&first[..n])
                .map_err(|e| format!("the re-encoded object does not parse: {e}"))?;
            let m = encode(&again, &mut second)?;
            if first[..n] != second[..m] {
                return Err("encode(parse(encode(parse(x)))) != encode(parse(x))".into());
            }
            if n != input.len() {
                return Err(format!(
                    "re-encoded in {n} bytes, parsed from {}",
                    input.len()
                ));
            }
            if let Some(map) = obj.as_map() {
                let _ = params::publish(&map);
                let _ = params::subscribe(&map);
                let _ = params::unsubscribe(&map);
            }
            Ok(true)
        }),
        fixup: None,
        slow: false,
    }
}

fn encode(obj: &Object<'_>, buf: &mut [u8]) -> Result<usize, String> {
    let mut e = Encoder::new(buf);
    e.object(obj)
        .map_err(|e| format!("encode of a parsed object: {e}"))?;
    Ok(e.written())
}

/// Visits every nested object (the iterators decode lazily).
fn walk(obj: &Object<'_>, depth: usize) {
    if depth > 64 {
        return;
    }
    if let Some(list) = obj.as_list() {
        for item in list.iter() {
            walk(&item, depth + 1);
        }
    }
    if let Some(map) = obj.as_map() {
        for (_, value) in map.iter() {
            walk(&value, depth + 1);
        }
        let _ = map.get(b"topic");
    }
    let _ = obj.as_f64();
}

// --- MQTT packets --------------------------------------------------------------

fn mqtt_packet(version: Version, name: &'static str) -> Target {
    let mut first = vec![0u8; 1 << 18];
    let mut second = vec![0u8; 1 << 18];
    Target {
        name,
        corpus: corpus::mqtt_packets(version),
        run: Box::new(move |input| {
            // The framer's view must agree with the parser's.
            let framed = packet_len(input);
            let Ok(p) = Packet::parse_as(input, version) else {
                return Ok(false);
            };
            if !matches!(framed, Ok(Some(n)) if n == input.len()) {
                return Err(format!("parsed, but packet_len says {framed:?}"));
            }
            if let Some(props) = properties(&p) {
                let _ = props.iter().count();
            }
            let n = p
                .emit(&mut first)
                .map_err(|e| format!("emit of a parsed packet: {e:?}"))?;
            let again = Packet::parse_as(&first[..n], version)
                .map_err(|e| format!("the re-emitted packet does not parse: {e:?}"))?;
            if again != p {
                return Err(format!("parse(emit(p)) != p: {p:?} / {again:?}"));
            }
            let m = again
                .emit(&mut second)
                .map_err(|e| format!("second emit: {e:?}"))?;
            if first[..n] != second[..m] {
                return Err("emit is not canonical".into());
            }
            Ok(true)
        }),
        fixup: Some(fix_remaining_length),
        slow: false,
    }
}

fn properties<'a>(p: &Packet<'a>) -> Option<Props<'a>> {
    match p {
        Packet::Connect(c) => c.properties,
        Packet::Connack(c) => c.properties,
        Packet::Publish(p) => p.properties,
        Packet::Puback { properties, .. }
        | Packet::Unsuback { properties, .. }
        | Packet::Disconnect { properties, .. } => *properties,
        Packet::Subscribe(s) => s.properties,
        Packet::Suback(s) => s.properties,
        Packet::Unsubscribe(u) => u.properties,
        Packet::Pingreq | Packet::Pingresp => None,
    }
}

/// Rewrites the remaining length to fit the bytes (one to four bytes).
fn fix_remaining_length(buf: &mut Vec<u8>, _rng: &mut Rng) {
    if buf.is_empty() {
        return;
    }
    // Drop the old varint (up to 4 bytes with the continuation bit).
    let mut old = 0;
    while old < 4 && 1 + old < buf.len() {
        old += 1;
        if buf[old] & 0x80 == 0 {
            break;
        }
    }
    let body: Vec<u8> = buf[1 + old..].to_vec();
    let mut n = body.len();
    buf.truncate(1);
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        buf.push(b);
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&body);
}

// --- MQTT 5 properties -----------------------------------------------------------

fn mqtt5_props() -> Target {
    Target {
        name: "mqtt5_props",
        corpus: corpus::property_blocks(),
        run: Box::new(|input| {
            // The first byte picks the packet type, the rest is the block.
            let Some((&ctx, block)) = input.split_first() else {
                return Ok(false);
            };
            let Ok(props) = Props::parse(block, Context(ctx & 0x0f)) else {
                return Ok(false);
            };
            if props.bytes() != block {
                return Err("a parsed block is not the bytes it came from".into());
            }
            let mut seen = 0;
            for (id, _value) in props.iter() {
                seen += 1;
                let _ = props.get(id);
            }
            if seen == 0 && !block.is_empty() {
                return Err("a non-empty block that parses yields no property".into());
            }
            Ok(true)
        }),
        fixup: None,
        slow: false,
    }
}

// --- the session -----------------------------------------------------------------

fn session(version: Version, name: &'static str) -> Target {
    Target {
        name,
        corpus: corpus::broker_streams(version),
        run: Box::new(move |input| {
            let t0 = Instant::from_millis(1_000);
            let mut s = Session::new(60, version);
            let connect = connect_packet("fuzz", true);
            s.start(t0, &connect).map_err(|e| format!("start: {e:?}"))?;
            let pending = s.pending_tx().len();
            s.consume_tx(t0, pending);
            let mut rest = input;
            let mut handled = 0;
            let mut t = t0;
            while !rest.is_empty() {
                let n = match packet_len(rest) {
                    Ok(Some(n)) if n <= rest.len() => n,
                    _ => break,
                };
                let (packet, after) = rest.split_at(n);
                rest = after;
                t = t + Duration::from_millis(5);
                if s.handle(t, packet).is_err() {
                    // A protocol error ends the connection: what the event
                    // loop does.
                    return Ok(handled > 0);
                }
                handled += 1;
                let pending = s.pending_tx().len();
                s.consume_tx(t, pending);
                let _ = s.poll(t);
            }
            let _ = s.poll(t + Duration::from_secs(120));
            Ok(handled > 0)
        }),
        fixup: None,
        slow: false,
    }
}

// --- the disk spool ------------------------------------------------------------------

/// A record as `event_loop/disk.rs` writes it (version 2).
fn record(
    pid: u32,
    retain: bool,
    topic: &str,
    props: &[u8],
    payload: &[u8],
    expires: u64,
) -> Vec<u8> {
    let mut r = vec![2u8, u8::from(retain)];
    r.extend_from_slice(&pid.to_le_bytes());
    r.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    r.extend_from_slice(&(props.len() as u16).to_le_bytes());
    r.extend_from_slice(&expires.to_le_bytes());
    r.extend_from_slice(topic.as_bytes());
    r.extend_from_slice(props);
    r.extend_from_slice(payload);
    r
}

fn spool_records() -> Vec<Vec<u8>> {
    vec![
        record(4242, false, "sensors/t", &[], b"21.5", 0),
        record(
            1,
            true,
            "a/b",
            &[0x01, 0x01, 0x03, 0x00, 0x04, b't', b'e', b'x', b't'],
            b"{}",
            1_700_000_000_000,
        ),
        record(
            7,
            false,
            "x",
            &[0x08, 0x00, 0x01, b'r', 0x09, 0x00, 0x01, b'c'],
            &[0u8; 300],
            0,
        ),
        // Version 1: no properties, no expiry.
        {
            let mut r = vec![1u8, 0];
            r.extend_from_slice(&9u32.to_le_bytes());
            r.extend_from_slice(&3u16.to_le_bytes());
            r.extend_from_slice(b"v/1old");
            r
        },
    ]
}

fn spool_record() -> Target {
    Target {
        name: "spool_record",
        corpus: spool_records(),
        run: Box::new(|input| Ok(iotcored::event_loop::decode_spool_record(input))),
        fixup: None,
        slow: false,
    }
}

/// `len` bytes of an in-memory file at `off`; past its end, UnexpectedEof.
fn range(file: &[u8], off: u64, len: usize) -> io::Result<&[u8]> {
    let at = usize::try_from(off).map_err(|_| io::ErrorKind::InvalidInput)?;
    Ok(file.get(at..at + len).ok_or(io::ErrorKind::UnexpectedEof)?)
}

/// As [`range`], to write.
fn range_mut(file: &mut [u8], off: u64, len: usize) -> io::Result<&mut [u8]> {
    let at = usize::try_from(off).map_err(|_| io::ErrorKind::InvalidInput)?;
    Ok(file
        .get_mut(at..at + len)
        .ok_or(io::ErrorKind::UnexpectedEof)?)
}

/// The journal's file in memory.
struct MemStorage(Vec<u8>);

impl Storage for MemStorage {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(range(&self.0, off, buf.len())?);
        Ok(())
    }

    fn write_at(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
        range_mut(&mut self.0, off, data.len())?.copy_from_slice(data);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The journal's file for one case: the target's scratch copy of the
/// image, with every range the journal writes noted, so that the next case
/// restores only those and the damaged bytes (copying the whole 1 MiB image
/// took half of each case's time).
struct Scratch<'a> {
    buf: &'a mut [u8],
    touched: &'a mut Vec<(usize, usize)>,
}

impl Storage for Scratch<'_> {
    fn size(&self) -> u64 {
        self.buf.len() as u64
    }

    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(range(self.buf, off, buf.len())?);
        Ok(())
    }

    fn write_at(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
        range_mut(self.buf, off, data.len())?.copy_from_slice(data);
        // In range: `off` fits a usize.
        self.touched.push((off as usize, data.len()));
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The journal target's input is a list of damages: (offset, byte) pairs,
/// four bytes of offset and one of value, applied to a journal that holds
/// records written since its checkpoint and released ones.
fn spool_journal() -> Target {
    let image = journal_image();
    let records = journal_records(&image);
    let mut out = vec![0u8; journal::MAX_RECORD];
    let mut scratch = image.clone();
    let mut touched: Vec<(usize, usize)> = Vec::new();
    let span = (journal::DATA_START as usize + 64 * 4096) as u32;
    Target {
        name: "spool_journal",
        corpus: vec![
            // No damage: every record comes back.
            vec![],
            // One byte in the first header slot, one in the ring.
            damage(&[(20, 0xff), (journal::DATA_START as u32 + 30, 0x00)]),
        ],
        run: Box::new(move |input| {
            // Undo the previous case (even one that failed half-way).
            for (at, len) in touched.drain(..) {
                scratch[at..at + len].copy_from_slice(&image[at..at + len]);
            }
            let mut edits = 0;
            for c in input.chunks_exact(5) {
                let off = (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % span) as usize;
                touched.push((off, 1));
                scratch[off] = c[4];
                edits += 1;
            }
            let store = Scratch {
                buf: &mut scratch,
                touched: &mut touched,
            };
            let (mut j, _recovered) = match Journal::open(store) {
                Ok(opened) => opened,
                Err(journal::Error::BadHeader) => return Ok(false),
                Err(e) => return Err(format!("open: {e}")),
            };
            let mut cur = j.cursor();
            let mut n = 0usize;
            while let Ok(Read::Record { len, .. }) = j.read(&mut cur, &mut out) {
                let _ = iotcored::event_loop::decode_spool_record(&out[..len]);
                n += 1;
                if n > 100_000 {
                    return Err("the read never ends".into());
                }
            }
            // Undamaged (or damaged to the same bytes), every record is
            // read back.
            if edits == 0 && n != records {
                return Err(format!(
                    "{n} of {records} records read back from an undamaged journal"
                ));
            }
            Ok(true)
        }),
        fixup: None,
        slow: true,
    }
}

fn damage(edits: &[(u32, u8)]) -> Vec<u8> {
    let mut v = Vec::new();
    for &(off, b) in edits {
        v.extend_from_slice(&off.to_le_bytes());
        v.push(b);
    }
    v
}

/// A 1 MiB journal: a checkpoint, then records after it, some released.
fn journal_image() -> Vec<u8> {
    let store = MemStorage(vec![0u8; journal::MIN_SIZE as usize]);
    let (mut j, _) = Journal::open(store).expect("a new journal");
    for (i, r) in spool_records().iter().enumerate().cycle().take(12) {
        let seq = j.append(r).expect("append");
        if i % 3 == 0 {
            j.release(seq).expect("release");
        }
        if i == 5 {
            j.sync().expect("sync");
        }
    }
    j.sync().expect("sync");
    j.storage().0.clone()
}

/// How many unreleased records the image holds.
fn journal_records(image: &[u8]) -> usize {
    let (mut j, _) = Journal::open(MemStorage(image.to_vec())).expect("the image opens");
    let mut cur = j.cursor();
    let mut out = vec![0u8; journal::MAX_RECORD];
    let mut n = 0;
    while let Ok(Read::Record { .. }) = j.read(&mut cur, &mut out) {
        n += 1;
    }
    assert!(n > 0, "the image holds records");
    n
}
