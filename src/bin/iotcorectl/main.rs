//! iotcorectl: the local command-line client of iotcored, in the spirit of
//! mosquitto_pub / mosquitto_sub, speaking the core bus of
//! `spec/core-bus.md` over the daemon's Unix socket `<socket-dir>/<name>`
//! [bus-sock-1].
//!
//! Requests are built with the crate's codecs (`bus::frame`, `bus::object`);
//! answers are read by a framer with a bounded buffer ([`RX_MAX_FRAME`]) and
//! checked, CRCs included, by the same codecs before anything is printed.
//! `pub -l` pipelines its calls on one connection and matches the answers
//! first in, first out [bus-req-4]; a subscription is the last request of its
//! connection [bus-req-4.2] and ends when the tool closes it.
//!
//! Exit status (also in `--help`): 0 success; 1 local error (no socket, bad
//! input, bad frame from the daemon, connection closed); 2 usage; 3 timeout;
//! 4 `status` found iotcored disconnected; 10 + N the daemon answered error
//! code N (an unknown code counts as FAILURE, 11).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::ffi::OsStringExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use iotcored::bus::frame::{self, ErrorCode, FrameLen, RequestType, Response};
use iotcored::bus::object::{self, Encoder, Object};
use iotcored::config::{MAX_INTERFACE_NAME_LEN, MAX_SOCKET_PATH_LEN};

/// Largest request this tool writes: the top of the daemon's configurable
/// frame limit [bus-frame-4]. A daemon built with a lower limit answers
/// NOMEM to a larger one [bus-err-2].
const TX_MAX_FRAME: usize = 1 << 20;

/// Largest frame this tool reads. A subscription message built from the
/// largest MQTT packet the daemon accepts (1 MiB) is its topic and payload
/// plus 51 bytes of map and framing; 1 KiB more leaves ample room.
const RX_MAX_FRAME: usize = (1 << 20) + 1024;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;

const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_TIMEOUT: u8 = 3;
const EXIT_DISCONNECTED: u8 = 4;
/// A daemon error code N exits with `EXIT_DAEMON + N`.
const EXIT_DAEMON: u8 = 10;

const HELP: &str = "\
Usage: iotcorectl [OPTIONS] COMMAND [COMMAND OPTIONS]

Local client of iotcored: talks to the daemon over its core bus socket
<socket-dir>/<interface_name>.

Commands:
  pub -t TOPIC [-m MESSAGE | -f FILE | -s | -l] [-q 0|1] [-r]
        publish one message (none of -m/-f/-s/-l: an empty payload)
  sub -t FILTER [-t FILTER ...] [-q 0|1] [-C COUNT] [-W SECONDS] [-v]
        subscribe and print each message's payload, raw, then a newline
  status [-w [-W SECONDS]]
        print connected or disconnected (with -w: every change)
  stats
        print the daemon's counters as \"key value\" lines

Options of pub:
  -t, --topic TOPIC           topic to publish to
  -m, --message MESSAGE       payload given here
  -f, --file FILE             payload read from FILE
  -s, --stdin-file            payload read from stdin, whole
  -l, --stdin-line            one message per line of stdin (blank lines are
                              skipped); calls are pipelined on one connection
  -q, --qos 0|1               quality of service [default: 0]
  -r, --retain                set the retain flag
Options of sub:
  -t, --topic FILTER          topic filter; repeat for several
  -q, --qos 0|1               quality of service [default: 0]
  -C, --count COUNT           exit after COUNT messages
  -W, --wait SECONDS          give up after SECONDS (exit status 3)
  -v, --verbose               print \"topic payload\" instead of the payload
Options of status:
  -w, --watch                 print every change until interrupted
  -W, --wait SECONDS          with -w: stop after SECONDS; the exit status
                              is then that of the last state

Common options (before or after COMMAND):
  -n, --interface_name NAME   core bus interface name [default: aws_iot_mqtt]
      --socket-dir DIR        socket directory [default: /run/greengrass]
      --timeout SECONDS       how long to wait for each answer [default: 10]
  -h, --help                  print this help
  -V, --version               print the version

Exit status:
  0      success
  1      local error: cannot connect, cannot read the input, bad frame from
         the daemon, connection closed by the daemon
  2      usage error
  3      timeout: no answer within --timeout, or -W passed
  4      status: iotcored is not connected to AWS IoT Core
  10+N   the daemon answered error code N:
           11 FAILURE   12 RETRY     13 BUSY      14 FATAL     15 INVALID
           16 UNSUPPORTED            17 PARSE     18 RANGE     19 NOMEM
           20 NOCONN    21 NODATA    22 NOENTRY   23 CONFIG    24 REMOTE
           25 EXPECTED  26 TIMEOUT   27 UNAUTHORIZED           28 CONFLICT
         an unknown code counts as FAILURE (11). With pub -l, the status of
         the first refused line.
";

fn main() -> ExitCode {
    let invocation = match parse(std::env::args_os().skip(1)) {
        Ok(Command::Run(invocation)) => invocation,
        Ok(Command::Help) => return print_and_exit(HELP),
        Ok(Command::Version) => {
            return print_and_exit(&format!("iotcorectl {}\n", env!("CARGO_PKG_VERSION")))
        }
        Err(e) => {
            eprintln!("iotcorectl: {e}\nTry 'iotcorectl --help' for more information.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(&invocation) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            // Like a tool killed by SIGPIPE: a closed stdout is no news.
            if !matches!(&e, Error::Stdout(io) if io.kind() == io::ErrorKind::BrokenPipe) {
                eprintln!("iotcorectl: {e}");
            }
            ExitCode::from(e.status())
        }
    }
}

fn print_and_exit(text: &str) -> ExitCode {
    match io::stdout().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(EXIT_ERROR),
    }
}

// ---------------------------------------------------------------------------
// Command line

/// What the command line asked for.
#[derive(Debug, PartialEq)]
enum Command {
    Run(Invocation),
    Help,
    Version,
}

/// A validated command line.
#[derive(Debug, PartialEq)]
struct Invocation {
    socket: PathBuf,
    /// How long to wait for each answer (and for each write).
    timeout: Duration,
    action: Action,
}

/// Where `pub` takes its payload from.
#[derive(Debug, PartialEq)]
enum Source {
    Empty,
    Message(Vec<u8>),
    File(PathBuf),
    Stdin,
    Lines,
}

/// The command and its own options.
#[derive(Debug, PartialEq)]
enum Action {
    Pub {
        topic: Vec<u8>,
        source: Source,
        qos: i64,
        retain: bool,
    },
    Sub {
        filters: Vec<Vec<u8>>,
        qos: i64,
        count: Option<u64>,
        wait: Option<Duration>,
        verbose: bool,
    },
    Status {
        watch: bool,
        wait: Option<Duration>,
    },
    Stats,
}

/// A usage error: the message names the option and what is wrong.
/// The daemon's usage error: the same message shape and `From<lexopt::Error>`.
use iotcored::config::UsageError;

fn usage<T>(msg: impl Into<String>) -> Result<T, UsageError> {
    Err(UsageError(msg.into()))
}

/// Every option as given, before the command decides which apply.
#[derive(Default)]
struct Raw {
    command: Option<String>,
    interface_name: Option<String>,
    socket_dir: Option<PathBuf>,
    timeout: Option<Duration>,
    topics: Vec<Vec<u8>>,
    source: Option<Source>,
    qos: Option<i64>,
    retain: bool,
    count: Option<u64>,
    wait: Option<Duration>,
    verbose: bool,
    watch: bool,
}

/// Parses the command line (without the program name).
fn parse<I>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::prelude::*;

    let mut raw = Raw::default();
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('n') | Long("interface_name") | Long("interface-name") => {
                raw.interface_name = Some(utf8(parser.value()?, "--interface_name")?);
            }
            Long("socket-dir") => raw.socket_dir = Some(PathBuf::from(parser.value()?)),
            Long("timeout") => raw.timeout = Some(seconds(parser.value()?, "--timeout")?),
            Short('t') | Long("topic") => raw.topics.push(parser.value()?.into_vec()),
            Short('m') | Long("message") => {
                set_source(&mut raw, Source::Message(parser.value()?.into_vec()))?;
            }
            Short('f') | Long("file") => {
                set_source(&mut raw, Source::File(PathBuf::from(parser.value()?)))?;
            }
            Short('s') | Long("stdin-file") => set_source(&mut raw, Source::Stdin)?,
            Short('l') | Long("stdin-line") => set_source(&mut raw, Source::Lines)?,
            Short('q') | Long("qos") => {
                raw.qos = Some(match utf8(parser.value()?, "-q")?.as_str() {
                    "0" => 0,
                    "1" => 1,
                    other => {
                        return usage(format!(
                            "-q: QoS {other:?} is not 0 or 1 (AWS IoT Core has no QoS 2)"
                        ))
                    }
                });
            }
            Short('r') | Long("retain") => raw.retain = true,
            Short('C') | Long("count") => {
                let text = utf8(parser.value()?, "-C")?;
                match text.parse::<u64>() {
                    Ok(n) if n > 0 => raw.count = Some(n),
                    _ => return usage(format!("-C: {text:?} is not a whole number above 0")),
                }
            }
            Short('W') | Long("wait") => raw.wait = Some(seconds(parser.value()?, "-W")?),
            Short('v') | Long("verbose") => raw.verbose = true,
            Short('w') | Long("watch") => raw.watch = true,
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            Value(v) if raw.command.is_none() => raw.command = Some(utf8(v, "COMMAND")?),
            Value(v) => {
                return usage(format!(
                    "unexpected argument {:?} (a value with spaces needs quotes)",
                    v.to_string_lossy()
                ))
            }
            _ => return Err(arg.unexpected().into()),
        }
    }
    validate(raw).map(Command::Run)
}

fn utf8(value: OsString, name: &str) -> Result<String, UsageError> {
    value
        .into_string()
        .or_else(|_| usage(format!("{name}: the value is not valid UTF-8")))
}

/// A positive number of seconds, fractions allowed.
fn seconds(value: OsString, name: &str) -> Result<Duration, UsageError> {
    let text = utf8(value, name)?;
    match text.parse::<f64>().map(Duration::try_from_secs_f64) {
        Ok(Ok(d)) if !d.is_zero() => Ok(d),
        _ => usage(format!(
            "{name}: {text:?} is not a number of seconds above 0"
        )),
    }
}

fn set_source(raw: &mut Raw, source: Source) -> Result<(), UsageError> {
    if raw.source.is_some() {
        return usage("give the payload once: one of -m, -f, -s, -l");
    }
    raw.source = Some(source);
    Ok(())
}

fn validate(raw: Raw) -> Result<Invocation, UsageError> {
    let name = raw
        .interface_name
        .unwrap_or_else(|| String::from("aws_iot_mqtt"));
    if name.is_empty() || name.len() > MAX_INTERFACE_NAME_LEN || name.contains(['/', '\0']) {
        return usage(format!(
            "--interface_name: {name:?} must be 1 to {MAX_INTERFACE_NAME_LEN} bytes without '/'"
        ));
    }
    let socket = raw
        .socket_dir
        .unwrap_or_else(|| PathBuf::from("/run/greengrass"))
        .join(name);
    if socket.as_os_str().len() > MAX_SOCKET_PATH_LEN {
        return usage(format!(
            "the bus socket path {} is longer than {MAX_SOCKET_PATH_LEN} bytes",
            socket.display()
        ));
    }
    let Some(command) = raw.command else {
        return usage("missing COMMAND: pub, sub, status or stats");
    };
    // The options each command does not take.
    let foreign: &[(bool, &str)] = match command.as_str() {
        "pub" => &[
            (raw.count.is_some(), "-C"),
            (raw.wait.is_some(), "-W"),
            (raw.verbose, "-v"),
            (raw.watch, "-w"),
        ],
        "sub" => &[
            (raw.source.is_some(), "-m/-f/-s/-l"),
            (raw.retain, "-r"),
            (raw.watch, "-w"),
        ],
        "status" | "stats" => &[
            (!raw.topics.is_empty(), "-t"),
            (raw.source.is_some(), "-m/-f/-s/-l"),
            (raw.qos.is_some(), "-q"),
            (raw.retain, "-r"),
            (raw.count.is_some(), "-C"),
            (raw.verbose, "-v"),
            (command == "stats" && raw.watch, "-w"),
            (command == "stats" && raw.wait.is_some(), "-W"),
        ],
        other => {
            return usage(format!(
                "unknown command {other:?}: pub, sub, status or stats"
            ))
        }
    };
    if let Some((_, flag)) = foreign.iter().find(|(given, _)| *given) {
        return usage(format!("{flag} does not apply to {command}"));
    }
    let qos = raw.qos.unwrap_or(0);
    let action = match command.as_str() {
        "pub" => {
            let mut topics = raw.topics.into_iter();
            let (Some(topic), None) = (topics.next(), topics.next()) else {
                return usage("pub takes exactly one -t TOPIC");
            };
            Action::Pub {
                topic,
                source: raw.source.unwrap_or(Source::Empty),
                qos,
                retain: raw.retain,
            }
        }
        "sub" => {
            if raw.topics.is_empty() {
                return usage("sub needs at least one -t FILTER");
            }
            Action::Sub {
                filters: raw.topics,
                qos,
                count: raw.count,
                wait: raw.wait,
                verbose: raw.verbose,
            }
        }
        "status" => {
            if raw.wait.is_some() && !raw.watch {
                return usage("-W applies to status only with -w");
            }
            Action::Status {
                watch: raw.watch,
                wait: raw.wait,
            }
        }
        _ => Action::Stats,
    };
    Ok(Invocation {
        socket,
        timeout: raw.timeout.unwrap_or(Duration::from_secs(10)),
        action,
    })
}

// ---------------------------------------------------------------------------
// Errors

/// Everything that ends a run early; `main` prints it on one line and exits
/// with [`Error::status`].
#[derive(Debug)]
enum Error {
    Connect(PathBuf, io::Error),
    Send(io::Error),
    Recv(io::Error),
    /// The daemon closed the connection.
    Closed,
    /// No answer (or no room to write) within the deadline.
    Timeout,
    /// `sub -W` passed after this many messages.
    WaitElapsed(u64),
    BadFrame(frame::Error),
    Oversized(usize),
    BadObject(object::Error),
    /// A well-formed answer that is not the one expected here.
    Unexpected(String),
    /// An error frame with this code.
    Daemon(i32),
    Input(String, io::Error),
    InputTooLarge(String),
    RequestTooLarge(usize),
    Encode(String),
    Stdout(io::Error),
}

impl Error {
    /// The exit status documented in `--help`.
    fn status(&self) -> u8 {
        match self {
            Error::Timeout | Error::WaitElapsed(_) => EXIT_TIMEOUT,
            Error::Daemon(code) => daemon_status(*code),
            _ => EXIT_ERROR,
        }
    }
}

/// `EXIT_DAEMON` + the code, FAILURE for a code outside the table.
fn daemon_status(code: i32) -> u8 {
    let code = ErrorCode::from_i32(code).unwrap_or(ErrorCode::Failure);
    // Codes run from 1 to 18, so the sum fits a u8.
    EXIT_DAEMON + u8::try_from(code.as_i32()).unwrap_or(1)
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect(path, e) => {
                write!(f, "cannot connect to {}: {e}", path.display())?;
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) {
                    f.write_str(" (is iotcored running?)")?;
                }
                Ok(())
            }
            Error::Send(e) => write!(f, "cannot send to the daemon: {e}"),
            Error::Recv(e) => write!(f, "cannot read from the daemon: {e}"),
            Error::Closed => f.write_str("the daemon closed the connection"),
            Error::Timeout => f.write_str("timed out waiting for the daemon (see --timeout)"),
            Error::WaitElapsed(n) => write!(f, "-W passed after {n} message(s)"),
            Error::BadFrame(e) => write!(f, "bad frame from the daemon: {e}"),
            Error::Oversized(n) => write!(
                f,
                "the daemon sent a {n}-byte frame, over this tool's limit of {RX_MAX_FRAME}"
            ),
            Error::BadObject(e) => write!(f, "bad answer from the daemon: {e}"),
            Error::Unexpected(what) => write!(f, "unexpected answer from the daemon: {what}"),
            Error::Daemon(code) => match ErrorCode::from_i32(*code) {
                Some(name) => write!(f, "daemon answered {name} ({code})"),
                None => write!(f, "daemon answered unknown error code {code}"),
            },
            Error::Input(what, e) => write!(f, "cannot read {what}: {e}"),
            Error::InputTooLarge(what) => {
                write!(
                    f,
                    "{what} is too large for the core bus ({TX_MAX_FRAME} bytes at most)"
                )
            }
            Error::RequestTooLarge(n) => write!(
                f,
                "the request would be {n} bytes, over the core bus limit of {TX_MAX_FRAME}"
            ),
            Error::Encode(e) => write!(f, "cannot encode the request: {e}"),
            Error::Stdout(e) => write!(f, "cannot write to stdout: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Requests

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
fn publish_request(topic: &[u8], payload: &[u8], qos: i64, retain: bool) -> Result<Vec<u8>, Error> {
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
    request(b"publish", RequestType::Call, len, |enc| {
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
    })
}

/// `subscribe` as a stream (no response_endpoint): `{topic_filter, qos}`,
/// the filter a buffer when there is one, a list of buffers otherwise.
fn subscribe_request(filters: &[Vec<u8>], qos: i64) -> Result<Vec<u8>, Error> {
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
    request(b"subscribe", RequestType::Subscribe, len, |enc| {
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
    })
}

/// A request whose params are an empty map (`connection_status`, `stats`).
fn empty_request(method: &[u8], kind: RequestType) -> Result<Vec<u8>, Error> {
    request(method, kind, object::MAP_HEADER_LEN, |enc| {
        enc.map(0).map(|_| ())
    })
}

// ---------------------------------------------------------------------------
// Answers

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
enum Reply<'a> {
    Accepted,
    Object(Object<'a>),
}

/// Checks a whole frame (CRCs included) and its object; an error frame is
/// `Error::Daemon`.
fn decode(bytes: &[u8]) -> Result<Reply<'_>, Error> {
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

fn unexpected(reply: &Reply<'_>, wanted: &str) -> Error {
    let got = match reply {
        Reply::Accepted => "an accepted frame",
        Reply::Object(obj) => kind_of(obj),
    };
    Error::Unexpected(format!("{got} where {wanted} was expected"))
}

/// One connection to the daemon.
struct Conn {
    stream: UnixStream,
    framer: Framer,
}

impl Conn {
    /// Connects; writes give up after `timeout`.
    fn open(path: &Path, timeout: Duration) -> Result<Conn, Error> {
        let stream = UnixStream::connect(path).map_err(|e| Error::Connect(path.into(), e))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(Error::Send)?;
        Ok(Conn {
            stream,
            framer: Framer::new(),
        })
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), Error> {
        send(&mut self.stream, frame)
    }

    /// The next frame, waiting until `deadline` (`None`: for ever).
    fn recv(&mut self, deadline: Option<Instant>) -> Result<&[u8], Error> {
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

fn send(stream: &mut UnixStream, frame: &[u8]) -> Result<(), Error> {
    stream.write_all(frame).map_err(|e| {
        if is_timeout(&e) {
            Error::Timeout
        } else {
            Error::Send(e)
        }
    })
}

/// The earlier of two optional deadlines.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

// ---------------------------------------------------------------------------
// Commands

/// Runs the command; `Ok` carries the exit status.
fn run(inv: &Invocation) -> Result<u8, Error> {
    match &inv.action {
        Action::Pub {
            topic,
            source: Source::Lines,
            qos,
            retain,
        } => {
            let mut conn = Conn::open(&inv.socket, inv.timeout)?;
            publish_lines(&mut conn, topic, *qos, *retain, inv.timeout)
        }
        Action::Pub {
            topic,
            source,
            qos,
            retain,
        } => {
            let payload = read_payload(source)?;
            let request = publish_request(topic, &payload, *qos, *retain)?;
            let mut conn = Conn::open(&inv.socket, inv.timeout)?;
            conn.send(&request)?;
            expect_null(conn.recv(Some(Instant::now() + inv.timeout))?)?;
            Ok(0)
        }
        Action::Sub {
            filters,
            qos,
            count,
            wait,
            verbose,
        } => {
            let request = subscribe_request(filters, *qos)?;
            let stop_at = wait.map(|w| Instant::now() + w);
            let mut conn = Conn::open(&inv.socket, inv.timeout)?;
            conn.send(&request)?;
            expect_accepted(
                &mut conn,
                earliest(stop_at, Some(Instant::now() + inv.timeout)),
            )?;
            let mut out = io::stdout().lock();
            let mut received = 0;
            while count.map_or(true, |c| received < c) {
                let bytes = match conn.recv(stop_at) {
                    Err(Error::Timeout) => return Err(Error::WaitElapsed(received)),
                    other => other?,
                };
                let (topic, payload) = message(decode(bytes)?)?;
                if *verbose {
                    out.write_all(topic).map_err(Error::Stdout)?;
                    out.write_all(b" ").map_err(Error::Stdout)?;
                }
                out.write_all(payload).map_err(Error::Stdout)?;
                out.write_all(b"\n").map_err(Error::Stdout)?;
                out.flush().map_err(Error::Stdout)?;
                received += 1;
            }
            Ok(0)
        }
        Action::Status { watch, wait } => {
            let request = empty_request(b"connection_status", RequestType::Subscribe)?;
            let mut conn = Conn::open(&inv.socket, inv.timeout)?;
            conn.send(&request)?;
            expect_accepted(&mut conn, Some(Instant::now() + inv.timeout))?;
            let mut out = io::stdout().lock();
            let first = Some(Instant::now() + inv.timeout);
            let mut connected = state(conn.recv(first)?)?;
            print_state(&mut out, connected)?;
            if *watch {
                let stop_at = wait.map(|w| Instant::now() + w);
                loop {
                    match conn.recv(stop_at) {
                        Err(Error::Timeout) => break,
                        other => connected = state(other?)?,
                    }
                    print_state(&mut out, connected)?;
                }
            }
            Ok(if connected { 0 } else { EXIT_DISCONNECTED })
        }
        Action::Stats => {
            let request = empty_request(b"stats", RequestType::Call)?;
            let mut conn = Conn::open(&inv.socket, inv.timeout)?;
            conn.send(&request)?;
            let reply = decode(conn.recv(Some(Instant::now() + inv.timeout))?)?;
            let Reply::Object(Object::Map(map)) = reply else {
                return Err(unexpected(&reply, "a map"));
            };
            let mut text = String::new();
            render(&mut text, "", &Object::Map(map));
            io::stdout()
                .lock()
                .write_all(text.as_bytes())
                .map_err(Error::Stdout)?;
            Ok(0)
        }
    }
}

fn expect_null(bytes: &[u8]) -> Result<(), Error> {
    match decode(bytes)? {
        Reply::Object(Object::Null) => Ok(()),
        other => Err(unexpected(&other, "null")),
    }
}

fn expect_accepted(conn: &mut Conn, deadline: Option<Instant>) -> Result<(), Error> {
    match decode(conn.recv(deadline)?)? {
        Reply::Accepted => Ok(()),
        other => Err(unexpected(&other, "an accepted frame")),
    }
}

/// A subscription message: `{topic: buffer, payload: buffer}`.
fn message(reply: Reply<'_>) -> Result<(&[u8], &[u8]), Error> {
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
fn state(bytes: &[u8]) -> Result<bool, Error> {
    match decode(bytes)? {
        Reply::Object(Object::Bool(b)) => Ok(b),
        other => Err(unexpected(&other, "a bool")),
    }
}

fn print_state(out: &mut impl Write, connected: bool) -> Result<(), Error> {
    let line: &[u8] = if connected {
        b"connected\n"
    } else {
        b"disconnected\n"
    };
    out.write_all(line)
        .and_then(|()| out.flush())
        .map_err(Error::Stdout)
}

/// Reads at most `TX_MAX_FRAME` bytes of `r` (the request could not be bigger).
fn read_bounded(r: impl Read, what: &str) -> Result<Vec<u8>, Error> {
    let mut data = Vec::new();
    let limit = u64::try_from(TX_MAX_FRAME).unwrap_or(u64::MAX);
    r.take(limit + 1)
        .read_to_end(&mut data)
        .map_err(|e| Error::Input(what.into(), e))?;
    if data.len() > TX_MAX_FRAME {
        return Err(Error::InputTooLarge(what.into()));
    }
    Ok(data)
}

fn read_payload(source: &Source) -> Result<Vec<u8>, Error> {
    match source {
        Source::Empty | Source::Lines => Ok(Vec::new()),
        Source::Message(m) => Ok(m.clone()),
        Source::File(path) => {
            let what = path.display().to_string();
            let file = File::open(path).map_err(|e| Error::Input(what.clone(), e))?;
            read_bounded(file, &what)
        }
        Source::Stdin => read_bounded(io::stdin().lock(), "stdin"),
    }
}

/// Reads one line of at most `TX_MAX_FRAME` bytes into `line` (cleared
/// first); false at the end of the input.
fn read_line(input: &mut impl BufRead, line: &mut Vec<u8>) -> Result<bool, Error> {
    line.clear();
    let limit = u64::try_from(TX_MAX_FRAME).unwrap_or(u64::MAX);
    let n = input
        .take(limit + 1)
        .read_until(b'\n', line)
        .map_err(|e| Error::Input("stdin".into(), e))?;
    if line.len() > TX_MAX_FRAME {
        return Err(Error::InputTooLarge("a line of stdin".into()));
    }
    Ok(n > 0)
}

/// A line without its `\n` or `\r\n`.
fn trim_line(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `pub -l`: a thread reads stdin and writes one publish call per non-blank
/// line; this thread reads the answers and matches them to the lines in
/// order [bus-req-4]. A refused line is reported and the rest go on; the
/// exit status is that of the first refusal.
fn publish_lines(
    conn: &mut Conn,
    topic: &[u8],
    qos: i64,
    retain: bool,
    timeout: Duration,
) -> Result<u8, Error> {
    let mut writer = conn.stream.try_clone().map_err(Error::Send)?;
    let topic = topic.to_vec();
    // Each sent call's line number, or the error that stopped the writer.
    let (tx, rx) = mpsc::channel::<Result<usize, Error>>();
    // Not joined: on an early error `main` returns while it may still be
    // blocked on stdin, and the process exits with it.
    thread::spawn(move || {
        let mut input = io::stdin().lock();
        let mut line = Vec::new();
        for line_no in 1.. {
            let sent = match read_line(&mut input, &mut line) {
                Ok(false) => return,
                Ok(true) if trim_line(&line).is_empty() => continue,
                Ok(true) => publish_request(&topic, trim_line(&line), qos, retain)
                    .and_then(|frame| send(&mut writer, &frame))
                    .map(|()| line_no),
                Err(e) => Err(e),
            };
            let stop = sent.is_err();
            if tx.send(sent).is_err() || stop {
                return;
            }
        }
    });

    let mut pending = VecDeque::new();
    let mut writer_error = None;
    let mut writer_done = false;
    let (mut published, mut refused, mut status) = (0u64, 0u64, 0u8);
    loop {
        // Learn of every call sent so far; block only when none is pending.
        loop {
            let event = if pending.is_empty() && !writer_done {
                rx.recv().map_err(|_| mpsc::TryRecvError::Disconnected)
            } else {
                rx.try_recv()
            };
            match event {
                Ok(Ok(line_no)) => pending.push_back(line_no),
                Ok(Err(e)) => writer_error = Some(e),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    writer_done = true;
                    break;
                }
            }
        }
        let Some(line_no) = pending.pop_front() else {
            break;
        };
        match conn
            .recv(Some(Instant::now() + timeout))
            .and_then(expect_null)
        {
            Ok(()) => published += 1,
            Err(e @ Error::Daemon(_)) => {
                eprintln!("iotcorectl: line {line_no}: {e}");
                if refused == 0 {
                    status = e.status();
                }
                refused += 1;
            }
            Err(e) => return Err(e),
        }
    }
    if refused > 0 {
        eprintln!(
            "iotcorectl: {published} of {} message(s) published",
            published + refused
        );
    }
    match writer_error {
        Some(e) => Err(e),
        None => Ok(status),
    }
}

// ---------------------------------------------------------------------------
// Output

/// Bytes as text: UTF-8 without control characters as is, else escaped.
fn text(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(char::is_control) => Cow::Borrowed(s),
        _ => Cow::Owned(bytes.escape_ascii().to_string()),
    }
}

/// Writes `obj` as `path value` lines; containers are flattened into
/// dotted paths (`connections.0.id thing`), an empty one is `[]` or `{}`.
/// Depth is bounded by the object codec's validation [bus-obj-1].
fn render(out: &mut String, path: &str, obj: &Object<'_>) {
    let child = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    let scalar = match obj {
        Object::Map(m) if !m.is_empty() => {
            for (k, v) in m.iter() {
                render(out, &child(&text(k)), &v);
            }
            return;
        }
        Object::List(l) if !l.is_empty() => {
            for (i, v) in l.iter().enumerate() {
                render(out, &child(&i.to_string()), &v);
            }
            return;
        }
        Object::Map(_) => Cow::Borrowed("{}"),
        Object::List(_) => Cow::Borrowed("[]"),
        Object::Null => Cow::Borrowed("null"),
        Object::Bool(b) => Cow::Owned(b.to_string()),
        Object::I64(v) => Cow::Owned(v.to_string()),
        Object::F64(v) => Cow::Owned(v.to_string()),
        Object::Buf(b) => text(b),
    };
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{path} {scalar}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use iotcored::bus::example;

    /// Parses a command line given as one string, split at spaces.
    fn parse_line(line: &str) -> Result<Command, UsageError> {
        parse(line.split_whitespace())
    }

    fn parse_ok(line: &str) -> Invocation {
        match parse_line(line) {
            Ok(Command::Run(inv)) => inv,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn parse_err(line: &str) -> String {
        match parse_line(line) {
            Err(UsageError(msg)) => msg,
            other => panic!("{line}: {other:?}"),
        }
    }

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

    #[test]
    fn pub_with_a_message_parses_with_defaults() {
        let inv = parse_ok("pub -t a/b -m hi");
        assert_eq!(inv.socket, Path::new("/run/greengrass/aws_iot_mqtt"));
        assert_eq!(inv.timeout, Duration::from_secs(10));
        let expected = Action::Pub {
            topic: b"a/b".to_vec(),
            source: Source::Message(b"hi".to_vec()),
            qos: 0,
            retain: false,
        };
        assert_eq!(inv.action, expected);
    }

    #[test]
    fn common_options_go_before_or_after_the_command() {
        let a = parse_ok("-n other --socket-dir /tmp/s --timeout 0.5 pub -t x -q1 -r -s");
        let b = parse_ok(
            "pub -t x --qos 1 --retain --stdin-file --timeout=0.5 \
             --interface_name other --socket-dir=/tmp/s",
        );
        assert_eq!(a, b);
        assert_eq!(a.socket, Path::new("/tmp/s/other"));
        assert_eq!(a.timeout, Duration::from_millis(500));
        let expected = Action::Pub {
            topic: b"x".to_vec(),
            source: Source::Stdin,
            qos: 1,
            retain: true,
        };
        assert_eq!(a.action, expected);
    }

    #[test]
    fn pub_takes_one_payload_source_or_none() {
        let source = |line: &str| match parse_ok(line).action {
            Action::Pub { source, .. } => source,
            other => panic!("{other:?}"),
        };
        assert_eq!(source("pub -t x"), Source::Empty);
        assert_eq!(
            source("pub -t x -f /etc/hosts"),
            Source::File("/etc/hosts".into())
        );
        assert_eq!(source("pub -t x -l"), Source::Lines);
        for line in ["pub -t x -m a -f b", "pub -t x -s -l", "pub -t x -m a -m b"] {
            let msg = parse_err(line);
            assert!(msg.contains("one of -m, -f, -s, -l"), "{line}: {msg}");
        }
    }

    #[test]
    fn sub_collects_every_filter_and_its_own_options() {
        let inv = parse_ok("sub -t a/# -t b/+ -C 3 -W 2 -v -q 1");
        let expected = Action::Sub {
            filters: vec![b"a/#".to_vec(), b"b/+".to_vec()],
            qos: 1,
            count: Some(3),
            wait: Some(Duration::from_secs(2)),
            verbose: true,
        };
        assert_eq!(inv.action, expected);
    }

    #[test]
    fn status_and_stats_parse() {
        let once = Action::Status {
            watch: false,
            wait: None,
        };
        assert_eq!(parse_ok("status").action, once);
        let watch = Action::Status {
            watch: true,
            wait: Some(Duration::from_millis(1500)),
        };
        assert_eq!(parse_ok("status -w -W 1.5").action, watch);
        assert_eq!(parse_ok("stats").action, Action::Stats);
    }

    #[test]
    fn help_and_version_win_over_everything_before_them() {
        assert_eq!(parse_line("pub -h"), Ok(Command::Help));
        assert_eq!(parse_line("--help"), Ok(Command::Help));
        assert_eq!(parse_line("-V"), Ok(Command::Version));
        assert_eq!(parse_line("sub --version"), Ok(Command::Version));
    }

    #[test]
    fn bad_command_lines_are_usage_errors_naming_the_problem() {
        let cases = [
            ("", "missing COMMAND"),
            ("publish", "unknown command \"publish\""),
            ("pub", "exactly one -t"),
            ("pub -t a -t b", "exactly one -t"),
            ("sub", "at least one -t"),
            ("pub -t a -q 2", "not 0 or 1"),
            ("sub -t a -C 0", "-C: \"0\""),
            ("sub -t a -W 0", "-W: \"0\""),
            ("sub -t a -W -1", "-W"),
            ("stats --timeout soon", "--timeout: \"soon\""),
            ("sub -t a -m x", "-m/-f/-s/-l does not apply to sub"),
            ("pub -t a -C 1", "-C does not apply to pub"),
            ("stats -w", "-w does not apply to stats"),
            ("status -W 1", "-W applies to status only with -w"),
            ("stats extra", "unexpected argument \"extra\""),
            ("stats -n a/b", "--interface_name"),
            ("stats --bogus", "--bogus"),
        ];
        for (line, expected) in cases {
            let msg = parse_err(line);
            assert!(msg.contains(expected), "{line}: {msg}");
        }
        let long_dir = format!("stats --socket-dir /{}", "d".repeat(100));
        assert!(parse_err(&long_dir).contains("longer than 107"));
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
        let fits = vec![b'x'; TX_MAX_FRAME - 200];
        assert!(publish_request(b"t", &fits, 0, false).is_ok());
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

    #[test]
    fn daemon_errors_exit_with_ten_plus_the_code_and_name_it() {
        assert_eq!(Error::Daemon(3).status(), 13);
        assert_eq!(Error::Daemon(5).status(), 15);
        assert_eq!(Error::Daemon(18).status(), 28);
        assert_eq!(Error::Daemon(99).status(), 11);
        assert_eq!(Error::Daemon(-1).status(), 11);
        assert_eq!(Error::Daemon(3).to_string(), "daemon answered BUSY (3)");
        assert_eq!(
            Error::Daemon(99).to_string(),
            "daemon answered unknown error code 99"
        );
        assert_eq!(Error::Timeout.status(), EXIT_TIMEOUT);
        assert_eq!(Error::WaitElapsed(2).status(), EXIT_TIMEOUT);
        assert_eq!(Error::Closed.status(), EXIT_ERROR);
    }

    #[test]
    fn the_help_lists_every_daemon_code_with_its_exit_status() {
        for code in 1..=18 {
            let name = ErrorCode::from_i32(code).unwrap().name();
            let entry = format!("{} {name}", 10 + code);
            assert!(HELP.contains(&entry), "{entry}");
        }
        assert!(HELP.lines().all(|l| l.len() <= 80));
    }

    #[test]
    fn stats_print_as_key_value_lines_with_dotted_paths() {
        let mut buf = [0u8; 512];
        let mut enc = Encoder::new(&mut buf);
        enc.map(4).unwrap();
        enc.key(b"published").unwrap().i64(12).unwrap();
        enc.key(b"ratio").unwrap().f64(0.5).unwrap();
        enc.key(b"connections").unwrap().list(2).unwrap();
        enc.map(3).unwrap();
        enc.key(b"id").unwrap().buf(b"thing").unwrap();
        enc.key(b"connected").unwrap().bool(true).unwrap();
        enc.key(b"inflight").unwrap().i64(0).unwrap();
        enc.map(2).unwrap();
        enc.key(b"id").unwrap().buf(b"thing_1\n").unwrap();
        enc.key(b"tags").unwrap().list(0).unwrap();
        enc.key(b"extra").unwrap().map(0).unwrap();
        let n = enc.written();
        let obj = Object::parse(&buf[..n]).unwrap();
        let mut out = String::new();
        render(&mut out, "", &obj);
        assert_eq!(
            out,
            "published 12\n\
             ratio 0.5\n\
             connections.0.id thing\n\
             connections.0.connected true\n\
             connections.0.inflight 0\n\
             connections.1.id thing_1\\n\n\
             connections.1.tags []\n\
             extra {}\n"
        );
    }

    #[test]
    fn lines_lose_their_line_ending_only() {
        assert_eq!(trim_line(b"hello\n"), b"hello");
        assert_eq!(trim_line(b"hello\r\n"), b"hello");
        assert_eq!(trim_line(b"last"), b"last");
        assert_eq!(trim_line(b" a \n"), b" a ");
        assert_eq!(trim_line(b"\n"), b"");
        let mut input = io::Cursor::new(b"one\n\ntwo".to_vec());
        let mut line = Vec::new();
        let mut lines = Vec::new();
        while read_line(&mut input, &mut line).unwrap() {
            lines.push(trim_line(&line).to_vec());
        }
        assert_eq!(lines, [b"one".to_vec(), b"".to_vec(), b"two".to_vec()]);
    }
}
