//! Talking to the daemon over its Unix socket `<socket-dir>/<name>`
//! [bus-sock-1]: request frames built with the crate's codecs
//! (`bus::frame`, `bus::object`), one connection per run, and its answers
//! read by a framer with a bounded buffer ([`RX_MAX_FRAME`]) and checked,
//! CRCs included, by the same codecs before anything is printed. A request
//! larger than [`TX_MAX_FRAME`] is refused before it is sent.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use iotcored::bus::frame::{self, FrameLen, RequestType, Response};
use iotcored::bus::object::{self, Encoder, Object};
use iotcored::service::params::{self, Method};

use crate::Error;

/// Largest request this tool writes: the top of the daemon's configurable
/// frame limit [bus-frame-4]. A daemon built with a lower limit answers
/// NOMEM to a larger one [bus-err-2].
pub(crate) const TX_MAX_FRAME: usize = 1 << 20;

/// Largest frame this tool reads. A subscription message built from the
/// largest MQTT packet the daemon accepts (1 MiB) is its topic and payload
/// plus 51 bytes of map and framing; 1 KiB more leaves ample room.
pub(crate) const RX_MAX_FRAME: usize = (1 << 20) + 1024;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;

/// Builds a request frame for `method` whose params map, `params_len` bytes
/// long, `encode` writes.
fn request(
    method: &[u8],
    kind: RequestType,
    params_len: usize,
    encode: impl FnOnce(&mut Encoder<'_>) -> Result<(), object::Error>,
) -> Result<Vec<u8>, Error> {
    let len = frame::request_len(method, params_len);
    if len > TX_MAX_FRAME {
        return Err(Error::RequestTooLarge(len));
    }
    let mut buf = vec![0; len];
    let mut emitter =
        frame::begin_request(&mut buf, method, kind).map_err(|e| Error::Encode(e.to_string()))?;
    let mut enc = Encoder::new(emitter.payload_mut());
    encode(&mut enc).map_err(|e| Error::Encode(e.to_string()))?;
    let written = enc.written();
    let n = emitter
        .finish(written)
        .map_err(|e| Error::Encode(e.to_string()))?;
    buf.truncate(n);
    Ok(buf)
}

/// `publish` as a call: `{topic, payload, qos}`, then `retain: true` only
/// when set, keys in that order. With `-t a/b -m hi -q 1` these are the 99
/// bytes of the worked example (core-bus.md section 5).
pub(crate) fn publish_request(
    topic: &[u8],
    payload: &[u8],
    qos: i64,
    retain: bool,
) -> Result<Vec<u8>, Error> {
    let mut len = object::MAP_HEADER_LEN
        + object::key_len(5)
        + object::buf_len(topic.len())
        + object::key_len(7)
        + object::buf_len(payload.len())
        + object::key_len(3)
        + object::I64_LEN;
    if retain {
        len += object::key_len(6) + object::BOOL_LEN;
    }
    let built = request(b"publish", RequestType::Call, len, |enc| {
        enc.map(if retain { 4 } else { 3 })?
            .key(b"topic")?
            .buf(topic)?
            .key(b"payload")?
            .buf(payload)?
            .key(b"qos")?
            .i64(qos)?;
        if retain {
            enc.key(b"retain")?.bool(true)?;
        }
        Ok(())
    })?;
    precheck(&built, Method::Publish)?;
    Ok(built)
}

/// The daemon's own check of a request's parameters (`params`), run on
/// the built frame before it is sent: the bus answers only a code, so a
/// request the daemon would refuse is stopped here with the reason
/// (`Error::Refused`). What depends on the daemon's state (the broker's
/// limits, full tables) is still the daemon's to say.
fn precheck(frame_bytes: &[u8], method: Method) -> Result<(), Error> {
    let Ok(request) = frame::parse(frame_bytes).and_then(|f| f.request()) else {
        return Ok(()); // not this check's business: the daemon answers it
    };
    let Ok(map) = object::parse_params(request.payload) else {
        return Ok(());
    };
    let checked = match method {
        Method::Publish => params::publish(&map).map(|_| ()),
        Method::Subscribe => params::subscribe(&map).map(|_| ()),
        _ => Ok(()),
    };
    checked.map_err(Error::Refused)
}

/// `subscribe` as a stream (no response_endpoint): `{topic_filter, qos}`,
/// the filter a buffer when there is one, a list of buffers otherwise.
pub(crate) fn subscribe_request(filters: &[Vec<u8>], qos: i64) -> Result<Vec<u8>, Error> {
    let filters_len = match filters {
        [one] => object::buf_len(one.len()),
        many => many
            .iter()
            .fold(object::LIST_HEADER_LEN, |n, f| n + object::buf_len(f.len())),
    };
    let len = object::MAP_HEADER_LEN
        + object::key_len(12)
        + filters_len
        + object::key_len(3)
        + object::I64_LEN;
    let built = request(b"subscribe", RequestType::Subscribe, len, |enc| {
        enc.map(2)?.key(b"topic_filter")?;
        match filters {
            [one] => {
                enc.buf(one)?;
            }
            many => {
                enc.list(many.len())?;
                for f in many {
                    enc.buf(f)?;
                }
            }
        }
        enc.key(b"qos")?.i64(qos)?;
        Ok(())
    })?;
    precheck(&built, Method::Subscribe)?;
    Ok(built)
}

/// A request whose params are an empty map (`connection_status`, `stats`).
pub(crate) fn empty_request(method: &[u8], kind: RequestType) -> Result<Vec<u8>, Error> {
    request(method, kind, object::MAP_HEADER_LEN, |enc| {
        enc.map(0).map(|_| ())
    })
}

/// Splits a byte stream into frames, holding at most one frame of
/// `RX_MAX_FRAME` bytes and one read beyond it.
struct Framer {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already handed out.
    consumed: usize,
}

impl Framer {
    fn new() -> Framer {
        Framer {
            buf: Vec::new(),
            consumed: 0,
        }
    }

    /// The length of the first buffered frame once it is complete.
    fn complete_len(&mut self) -> Result<Option<usize>, Error> {
        self.buf.drain(..self.consumed);
        self.consumed = 0;
        match frame::frame_len(&self.buf, RX_MAX_FRAME) {
            FrameLen::NeedPrelude => Ok(None),
            FrameLen::Len(n) if self.buf.len() < n => Ok(None),
            FrameLen::Len(n) => Ok(Some(n)),
            FrameLen::Invalid(e) => Err(Error::BadFrame(e)),
            FrameLen::Oversized { total_len } => Err(Error::Oversized(total_len)),
        }
    }

    /// Hands out the first `n` bytes, which `complete_len` said form a frame.
    fn take(&mut self, n: usize) -> &[u8] {
        self.consumed = n.min(self.buf.len());
        &self.buf[..self.consumed]
    }

    /// Reads once from `r`; the end of the stream is `Error::Closed`.
    fn fill(&mut self, r: &mut impl Read) -> Result<(), Error> {
        let start = self.buf.len();
        self.buf.resize(start + READ_CHUNK, 0);
        let result = loop {
            match r.read(&mut self.buf[start..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let n = result.as_ref().map_or(0, |&n| n);
        self.buf.truncate(start + n);
        match result {
            Ok(0) => Err(Error::Closed),
            Ok(_) => Ok(()),
            Err(e) if is_timeout(&e) => Err(Error::Timeout),
            Err(e) => Err(Error::Recv(e)),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A response frame, read the way GGL clients read it.
#[derive(Debug, PartialEq)]
pub(crate) enum Reply<'a> {
    Accepted,
    Object(Object<'a>),
}

/// Checks a whole frame (CRCs included) and its object; an error frame is
/// `Error::Daemon`.
pub(crate) fn decode(bytes: &[u8]) -> Result<Reply<'_>, Error> {
    match frame::parse(bytes).map_err(Error::BadFrame)?.response() {
        Response::Error(code) => Err(Error::Daemon(code)),
        Response::Accepted => Ok(Reply::Accepted),
        Response::Payload(p) => Object::parse(p)
            .map(Reply::Object)
            .map_err(Error::BadObject),
    }
}

/// What an object is, for error messages.
fn kind_of(obj: &Object<'_>) -> &'static str {
    match obj {
        Object::Null => "null",
        Object::Bool(_) => "a bool",
        Object::I64(_) => "an i64",
        Object::F64(_) => "an f64",
        Object::Buf(_) => "a buffer",
        Object::List(_) => "a list",
        Object::Map(_) => "a map",
    }
}

pub(crate) fn unexpected(reply: &Reply<'_>, wanted: &str) -> Error {
    let got = match reply {
        Reply::Accepted => "an accepted frame",
        Reply::Object(obj) => kind_of(obj),
    };
    Error::Unexpected(format!("{got} where {wanted} was expected"))
}

/// One connection to the daemon.
pub(crate) struct Conn {
    stream: UnixStream,
    framer: Framer,
}

impl Conn {
    /// Connects; writes give up after `timeout`.
    pub(crate) fn open(path: &Path, timeout: Duration) -> Result<Conn, Error> {
        let stream = UnixStream::connect(path).map_err(|e| Error::Connect(path.into(), e))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(Error::Send)?;
        Ok(Conn {
            stream,
            framer: Framer::new(),
        })
    }

    pub(crate) fn send(&mut self, frame: &[u8]) -> Result<(), Error> {
        send(&mut self.stream, frame)
    }

    /// A second handle on the socket, for a thread that writes while this
    /// one reads the answers.
    pub(crate) fn writer(&self) -> Result<UnixStream, Error> {
        self.stream.try_clone().map_err(Error::Send)
    }

    /// The next frame, waiting until `deadline` (`None`: for ever).
    pub(crate) fn recv(&mut self, deadline: Option<Instant>) -> Result<&[u8], Error> {
        loop {
            if let Some(n) = self.framer.complete_len()? {
                return Ok(self.framer.take(n));
            }
            let wait = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Err(Error::Timeout),
                },
            };
            self.stream.set_read_timeout(wait).map_err(Error::Recv)?;
            self.framer.fill(&mut self.stream)?;
        }
    }
}

pub(crate) fn send(stream: &mut UnixStream, frame: &[u8]) -> Result<(), Error> {
    stream.write_all(frame).map_err(|e| {
        if is_timeout(&e) {
            Error::Timeout
        } else {
            Error::Send(e)
        }
    })
}

/// The earlier of two optional deadlines.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

pub(crate) fn expect_null(bytes: &[u8]) -> Result<(), Error> {
    match decode(bytes)? {
        Reply::Object(Object::Null) => Ok(()),
        other => Err(unexpected(&other, "null")),
    }
}

pub(crate) fn expect_accepted(conn: &mut Conn, deadline: Option<Instant>) -> Result<(), Error> {
    match decode(conn.recv(deadline)?)? {
        Reply::Accepted => Ok(()),
        other => Err(unexpected(&other, "an accepted frame")),
    }
}

/// A subscription message: `{topic: buffer, payload: buffer}`.
pub(crate) fn message(reply: Reply<'_>) -> Result<(&[u8], &[u8]), Error> {
    if let Reply::Object(Object::Map(map)) = &reply {
        let topic = map.get(b"topic").and_then(|o| o.as_buf());
        let payload = map.get(b"payload").and_then(|o| o.as_buf());
        if let (Some(topic), Some(payload)) = (topic, payload) {
            return Ok((topic, payload));
        }
    }
    Err(unexpected(&reply, "a {topic, payload} map"))
}

/// A connection_status stream item: a bool.
pub(crate) fn state(bytes: &[u8]) -> Result<bool, Error> {
    match decode(bytes)? {
        Reply::Object(Object::Bool(b)) => Ok(b),
        other => Err(unexpected(&other, "a bool")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::tests::parse_ok;
    use crate::args::{Action, Source};
    use crate::EXIT_ERROR;
    use iotcored::bus::example;

    fn frame_of(headers: &[(&str, frame::HeaderValue<'_>)], payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0; frame::buffer_len(headers, payload.len())];
        let n = frame::emit(&mut buf, headers, payload).unwrap();
        assert_eq!(n, buf.len());
        buf
    }

    /// The request frame's params, checked as the daemon would check them.
    fn params_of(frame: &[u8], method: &[u8], kind: RequestType) -> Vec<(Vec<u8>, String)> {
        let f = frame::parse(frame).unwrap();
        let req = f.request().unwrap();
        assert_eq!((req.method, req.kind), (method, kind));
        object::parse_params(req.payload)
            .unwrap()
            .iter()
            .map(|(k, v)| (k.to_vec(), format!("{v:?}")))
            .collect()
    }

    /// core-bus.md section 5, byte for byte. The tool emits the keys in the
    /// order topic, payload, qos and leaves `retain` out when it is false,
    /// which is exactly the worked example's payload.
    #[test]
    fn pub_t_a_b_m_hi_q_1_is_the_worked_example() {
        let Action::Pub {
            topic,
            source: Source::Message(payload),
            qos,
            retain,
        } = parse_ok("pub -t a/b -m hi -q 1").action
        else {
            panic!("not a pub");
        };
        let frame = publish_request(&topic, &payload, qos, retain).unwrap();
        assert_eq!(frame, example::PUBLISH_CALL);
    }

    #[test]
    fn retain_adds_a_fourth_key_only_when_set() {
        let frame = publish_request(b"t", b"", 0, true).unwrap();
        let params = params_of(&frame, b"publish", RequestType::Call);
        let keys: Vec<&[u8]> = params.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, [&b"topic"[..], b"payload", b"qos", b"retain"]);
        assert_eq!(params[3].1, "Bool(true)");
        assert_eq!(params[1].1, "Buf([])");
    }

    #[test]
    fn one_filter_is_a_buffer_and_several_are_a_list() {
        let frame = subscribe_request(&[b"a/#".to_vec()], 1).unwrap();
        let params = params_of(&frame, b"subscribe", RequestType::Subscribe);
        assert_eq!(
            params[0],
            (b"topic_filter".to_vec(), "Buf([97, 47, 35])".into())
        );
        assert_eq!(params[1], (b"qos".to_vec(), "I64(1)".into()));

        let frame = subscribe_request(&[b"a".to_vec(), b"b".to_vec()], 0).unwrap();
        let f = frame::parse(&frame).unwrap();
        let map = object::parse_params(f.request().unwrap().payload).unwrap();
        let list: Vec<Object<'_>> = map
            .get(b"topic_filter")
            .unwrap()
            .as_list()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(list, [Object::Buf(b"a"), Object::Buf(b"b")]);
    }

    #[test]
    fn status_and_stats_send_an_empty_map() {
        let frame = empty_request(b"connection_status", RequestType::Subscribe).unwrap();
        assert!(params_of(&frame, b"connection_status", RequestType::Subscribe).is_empty());
        assert_eq!(
            frame::parse(&frame).unwrap().payload(),
            [object::TAG_MAP, 0, 0, 0, 0]
        );
        let frame = empty_request(b"stats", RequestType::Call).unwrap();
        assert!(params_of(&frame, b"stats", RequestType::Call).is_empty());
    }

    #[test]
    fn a_request_over_the_bus_limit_is_refused_before_sending() {
        let big = vec![b'x'; TX_MAX_FRAME];
        assert!(matches!(
            publish_request(b"t", &big, 0, false),
            Err(Error::RequestTooLarge(n)) if n > TX_MAX_FRAME
        ));
        let fits = vec![b'x'; iotcored::service::params::MAX_PAYLOAD];
        assert!(publish_request(b"t", &fits, 0, false).is_ok());
    }

    #[test]
    fn a_request_the_daemon_would_refuse_is_stopped_here_with_the_reason() {
        let over = vec![b'x'; iotcored::service::params::MAX_PAYLOAD + 1];
        let err = publish_request(b"t", &over, 0, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "payload is 131073 bytes; AWS IoT Core allows 131072 (not sent: the daemon would answer RANGE)"
        );
        assert_eq!(err.status(), 18);
        let err = publish_request(b"a/#", b"x", 0, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "wildcards (+ and #) are not allowed in a publish topic (not sent: the daemon would answer INVALID)"
        );
        assert_eq!(err.status(), 15);
        let err = subscribe_request(&[b"a/#/b".to_vec()], 0).unwrap_err();
        assert_eq!(err.status(), 15);
        assert!(
            err.to_string().starts_with("topic filter: a wildcard"),
            "{err}"
        );
    }

    /// Hands out its bytes `step` at a time, then reports the end.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    /// Every frame the framer yields from `data`, and how it stopped.
    fn frames(data: &[u8], step: usize) -> (Vec<Vec<u8>>, Error) {
        let mut r = Trickle {
            data: data.to_vec(),
            at: 0,
            step,
        };
        let mut framer = Framer::new();
        let mut out = Vec::new();
        loop {
            match framer.complete_len() {
                Ok(Some(n)) => out.push(framer.take(n).to_vec()),
                Ok(None) => {
                    if let Err(e) = framer.fill(&mut r) {
                        return (out, e);
                    }
                }
                Err(e) => return (out, e),
            }
        }
    }

    const NULL_RESULT: &str = "00000011 00000000 38a2615b 00 a171ab15";
    const ERROR_NOENTRY: &str = "0000001b 0000000b e5c0a072 05 6572726f72 04 0000000c 6dc53908";
    const ACCEPTED: &str = "0000001e 0000000e 5d4adb8d 08 6163636570746564 04 00000001 f254b2ef";
    const MESSAGE_TRUE: &str = "00000012 00000000 7f021b8b 01 01 a3f1cd91";

    /// The spec's hex notation to bytes.
    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|d| u8::from_str_radix(std::str::from_utf8(d).unwrap(), 16).unwrap())
            .collect()
    }

    #[test]
    fn the_framer_fed_one_byte_at_a_time_yields_every_frame_once() {
        let golden = [NULL_RESULT, ERROR_NOENTRY, ACCEPTED, MESSAGE_TRUE].map(hex);
        let stream = golden.concat();
        for step in [1, 5, 16, READ_CHUNK] {
            let (got, end) = frames(&stream, step);
            assert_eq!(got, golden, "step {step}");
            assert!(matches!(end, Error::Closed), "step {step}: {end:?}");
        }
    }

    #[test]
    fn the_spec_answers_decode_to_their_meaning() {
        assert_eq!(
            decode(&hex(NULL_RESULT)).unwrap(),
            Reply::Object(Object::Null)
        );
        assert!(matches!(
            decode(&hex(ERROR_NOENTRY)),
            Err(Error::Daemon(12))
        ));
        assert_eq!(decode(&hex(ACCEPTED)).unwrap(), Reply::Accepted);
        assert_eq!(
            decode(&hex(MESSAGE_TRUE)).unwrap(),
            Reply::Object(Object::Bool(true))
        );
        assert!(expect_null(&hex(NULL_RESULT)).is_ok());
        assert!(matches!(
            expect_null(&hex(MESSAGE_TRUE)),
            Err(Error::Unexpected(_))
        ));
        assert!(state(&hex(MESSAGE_TRUE)).unwrap());
    }

    #[test]
    fn a_corrupt_or_oversized_answer_is_a_local_error_not_a_panic() {
        let mut bad = hex(NULL_RESULT);
        bad[16] ^= 1; // the message CRC
        assert!(matches!(
            decode(&bad),
            Err(Error::BadFrame(frame::Error::MessageCrc))
        ));
        bad[8] ^= 1; // the prelude CRC: the stream cannot be resynchronised
        let (got, end) = frames(&bad, 1);
        assert!(got.is_empty());
        assert!(matches!(end, Error::BadFrame(frame::Error::PreludeCrc)));
        assert_eq!(end.status(), EXIT_ERROR);
        // A result frame with no object at all.
        let empty = frame_of(&[], b"");
        assert!(matches!(
            decode(&empty),
            Err(Error::BadObject(object::Error::Truncated))
        ));
        // A prelude claiming 16 MiB is refused before anything is buffered.
        let mut huge = frame_of(&[], &[0; 4]);
        huge[..4].copy_from_slice(&(16u32 << 20).to_be_bytes());
        let crc = frame::crc32(&huge[..8]);
        huge[8..12].copy_from_slice(&crc.to_be_bytes());
        let (_, end) = frames(&huge, 1);
        assert!(matches!(end, Error::Oversized(n) if n == 16 << 20));
        // Cut short: the daemon closed the connection mid-frame.
        let (got, end) = frames(&hex(ACCEPTED)[..20], 3);
        assert!(got.is_empty());
        assert!(matches!(end, Error::Closed));
    }

    #[test]
    fn a_subscription_message_needs_topic_and_payload_buffers() {
        let mut params = [0u8; 64];
        let mut enc = Encoder::new(&mut params);
        enc.map(2)
            .unwrap()
            .key(b"topic")
            .unwrap()
            .buf(b"a/b")
            .unwrap();
        enc.key(b"payload").unwrap().buf(b"\x00\xffraw").unwrap();
        let n = enc.written();
        let msg = frame_of(&[], &params[..n]);
        assert_eq!(
            message(decode(&msg).unwrap()).unwrap(),
            (&b"a/b"[..], &b"\x00\xffraw"[..])
        );
        assert!(matches!(
            message(decode(&hex(MESSAGE_TRUE)).unwrap()),
            Err(Error::Unexpected(_))
        ));
    }
}
