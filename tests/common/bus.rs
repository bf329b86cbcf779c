//! A blocking core bus client for tests, built on the crate's own codecs,
//! plus raw-frame helpers for the malformed-input cases.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use iotcored::bus::frame::{self, FrameLen, HeaderValue, RequestType, Response};
use iotcored::bus::object::{Encoder, Object};

use super::Logged;

/// An owned response frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// A result or stream message: the payload object's bytes.
    Payload(Vec<u8>),
    /// An error frame with this code.
    Error(i32),
    /// `accepted`.
    Accepted,
}

impl Reply {
    /// The payload parsed as an object (panics on other replies).
    pub fn object(&self) -> Object<'_> {
        match self {
            Reply::Payload(p) => Object::parse(p).expect("payload object"),
            other => panic!("expected a payload, got {other:?}"),
        }
    }

    /// For a `{topic, payload}` message: both as owned values.
    pub fn message(&self) -> (String, Vec<u8>) {
        let map = self.object().as_map().expect("map");
        let topic = map.get(b"topic").and_then(|o| o.as_buf()).expect("topic");
        let payload = map
            .get(b"payload")
            .and_then(|o| o.as_buf())
            .expect("payload");
        (
            String::from_utf8_lossy(topic).into_owned(),
            payload.to_vec(),
        )
    }
}

/// Error codes used by the tests.
pub mod code {
    pub const BUSY: i32 = 3;
    pub const INVALID: i32 = 5;
    pub const UNSUPPORTED: i32 = 6;
    pub const PARSE: i32 = 7;
    pub const RANGE: i32 = 8;
    pub const NOMEM: i32 = 9;
    pub const NOENTRY: i32 = 12;
    pub const REMOTE: i32 = 14;
    pub const TIMEOUT: i32 = 16;
    pub const UNAUTHORIZED: i32 = 17;
}

/// A connection to the daemon's bus socket.
pub struct BusClient {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl BusClient {
    /// Connects, with a 10 s read timeout. A refusal is retried for up to
    /// 5 s: the harness waits for the socket file, and the kernel creates
    /// it in bind(2), before the daemon's listen(2) (a connect in between
    /// is refused).
    pub fn connect(path: &Path) -> BusClient {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("connect {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        BusClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// Tries to connect; `None` if the socket refuses.
    pub fn try_connect(path: &Path) -> Option<BusClient> {
        let stream = UnixStream::connect(path).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        Some(BusClient {
            stream,
            buf: Vec::new(),
        })
    }

    /// The raw stream.
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// Sets the read timeout.
    pub fn timeout(&mut self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).unwrap();
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the bus");
    }

    /// Sends a request frame.
    pub fn send(&mut self, method: &str, kind: RequestType, params: &[u8]) {
        let bytes = request(method, kind, params);
        self.send_raw(&bytes);
    }

    /// Reads one frame; `None` on EOF or timeout.
    pub fn read(&mut self) -> Option<Reply> {
        loop {
            if let FrameLen::Len(n) = frame::frame_len(&self.buf, 2 << 20) {
                if self.buf.len() >= n {
                    let bytes: Vec<u8> = self.buf.drain(..n).collect();
                    let f = frame::parse(&bytes).expect("a valid frame from the daemon");
                    return Some(match f.response() {
                        Response::Error(code) => Reply::Error(code),
                        Response::Accepted => Reply::Accepted,
                        Response::Payload(p) => Reply::Payload(p.to_vec()),
                    });
                }
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Whether the daemon closed the connection within the timeout: EOF,
    /// or a reset (the daemon closed with our unread request bytes still in
    /// its buffer; the answer before it was readable all the same).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    /// A call: sends it and reads the answer.
    pub fn call(&mut self, method: &str, params: &[u8]) -> Option<Reply> {
        self.send(method, RequestType::Call, params);
        self.read()
    }
}

/// A request frame.
pub fn request(method: &str, kind: RequestType, params: &[u8]) -> Vec<u8> {
    let headers = [
        ("method", HeaderValue::Str(method.as_bytes())),
        ("type", HeaderValue::I32(kind as i32)),
    ];
    let mut buf = vec![0u8; frame::buffer_len(&headers, params.len())];
    let n = frame::emit(&mut buf, &headers, params).expect("emit request");
    buf.truncate(n);
    buf
}

/// A params value.
pub enum V<'a> {
    Buf(&'a [u8]),
    I64(i64),
    Bool(bool),
    List(Vec<&'a [u8]>),
    /// A map of buffers, in order.
    Map(Vec<(&'a [u8], &'a [u8])>),
}

/// Encodes a params map.
pub fn params(entries: &[(&str, V<'_>)]) -> Vec<u8> {
    let size: usize = 5 + entries
        .iter()
        .map(|(k, v)| {
            4 + k.len()
                + match v {
                    V::Buf(b) => 5 + b.len(),
                    V::I64(_) => 9,
                    V::Bool(_) => 2,
                    V::List(l) => 5 + l.iter().map(|b| 5 + b.len()).sum::<usize>(),
                    V::Map(m) => 5 + m.iter().map(|(k, v)| 9 + k.len() + v.len()).sum::<usize>(),
                }
        })
        .sum::<usize>();
    let mut buf = vec![0u8; size];
    let mut e = Encoder::new(&mut buf);
    e.map(entries.len()).unwrap();
    for (k, v) in entries {
        e.key(k.as_bytes()).unwrap();
        match v {
            V::Buf(b) => e.buf(b).unwrap(),
            V::I64(i) => e.i64(*i).unwrap(),
            V::Bool(b) => e.bool(*b).unwrap(),
            V::List(items) => {
                e.list(items.len()).unwrap();
                for i in items {
                    e.buf(i).unwrap();
                }
                &mut e
            }
            V::Map(pairs) => {
                e.map(pairs.len()).unwrap();
                for (k, v) in pairs {
                    e.key(k).unwrap().buf(v).unwrap();
                }
                &mut e
            }
        };
    }
    let n = e.written();
    buf.truncate(n);
    buf
}

/// `publish` params.
pub fn publish_params(topic: &str, payload: &[u8], qos: i64) -> Vec<u8> {
    params(&[
        ("topic", V::Buf(topic.as_bytes())),
        ("payload", V::Buf(payload)),
        ("qos", V::I64(qos)),
    ])
}

/// `subscribe` params for a list of filters.
pub fn subscribe_params(filters: &[&str], qos: i64) -> Vec<u8> {
    params(&[
        (
            "topic_filter",
            V::List(filters.iter().map(|f| f.as_bytes()).collect()),
        ),
        ("qos", V::I64(qos)),
    ])
}

/// Whether a reply is a call's null result (payload `00`).
pub fn is_null(r: &Option<Reply>) -> bool {
    r.as_ref() == Some(&Reply::Payload(vec![0]))
}

/// The daemon's `stats` counters (the i64 ones), by one call.
pub fn stats(sock: &Path) -> std::collections::HashMap<String, i64> {
    let mut c = BusClient::connect(sock);
    let reply = c.call("stats", &params(&[])).expect("stats answer");
    stats_counters(&reply).expect("a stats map")
}

/// The i64 counters of a `stats` answer; `None` if it is not a map.
pub fn stats_counters(reply: &Reply) -> Option<std::collections::HashMap<String, i64>> {
    let Reply::Payload(p) = reply else {
        return None;
    };
    let map = Object::parse(p).ok()?.as_map()?;
    Some(
        map.iter()
            .filter_map(|(k, v)| Some((String::from_utf8_lossy(k).into_owned(), v.as_i64()?)))
            .collect(),
    )
}

/// Starts `bin` against `port` with its bus socket in its own directory
/// (`--socket-dir .`) and `extra` options; returns once the socket exists.
pub fn start_with_bus(
    bin: &Path,
    port: u16,
    id: &str,
    extra: &[&str],
) -> (super::Daemon, std::path::PathBuf) {
    let mut args = super::iotcored_args(super::Pki::get(), port, id);
    args.extend(["--socket-dir".into(), ".".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let d = super::Daemon::start(bin, &args);
    let sock = d.dir().join("aws_iot_mqtt");
    assert!(
        super::wait_until(Duration::from_secs(5), || sock.exists()),
        "no bus socket; log:\n{}",
        d.log()
    );
    (d, sock)
}

/// `start_with_bus`, then waits (10 s at most) until the daemon logs its
/// first CONNACK.
pub fn connected_with_bus(
    bin: &Path,
    port: u16,
    id: &str,
    extra: &[&str],
) -> (super::Daemon, std::path::PathBuf) {
    let (d, sock) = start_with_bus(bin, port, id, extra);
    assert!(
        d.wait_log("connected (session present", Duration::from_secs(10)),
        "{}",
        d.log()
    );
    (d, sock)
}
