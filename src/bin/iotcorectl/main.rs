//! iotcorectl: the local command-line client of iotcored, in the spirit of
//! mosquitto_pub / mosquitto_sub, speaking the core bus of
//! `spec/core-bus.md` over the daemon's Unix socket `<socket-dir>/<name>`
//! [bus-sock-1].
//!
//! This file is the entry point: it runs the command `args` parsed, over a
//! `client` connection, printing through `output`, and turns every way a run
//! ends ([`Error`]) into an exit status. `pub -l` pipelines its calls on one
//! connection and matches the answers first in, first out [bus-req-4]; a
//! subscription is the last request of its connection [bus-req-4.2] and ends
//! when the tool closes it.
//!
//! Exit status (also in `--help`): 0 success; 1 local error (no socket, bad
//! input, bad frame from the daemon, connection closed); 2 usage; 3 timeout;
//! 4 `status` found iotcored disconnected; 10 + N the daemon answered error
//! code N (an unknown code counts as FAILURE, 11).

mod args;
mod client;
mod output;

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use iotcored::bus::frame::{self, ErrorCode, RequestType};
use iotcored::bus::object::{self, Object};

use args::{parse, Action, Command, Invocation, Source, HELP};
use client::{
    decode, earliest, empty_request, expect_accepted, expect_null, message, publish_request, send,
    state, subscribe_request, unexpected, Conn, Reply, RX_MAX_FRAME, TX_MAX_FRAME,
};
use output::{print_message, print_state, print_stats};

const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_TIMEOUT: u8 = 3;
const EXIT_DISCONNECTED: u8 = 4;
/// A daemon error code N exits with `EXIT_DAEMON + N`.
const EXIT_DAEMON: u8 = 10;

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
    /// Not sent: the daemon's own check refuses it, for this reason.
    Refused(iotcored::service::params::Refusal),
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
            Error::Refused(r) => daemon_status(r.code.as_i32()),
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
                Some(name) => write!(f, "daemon answered {name} ({code}): {}", explain(name)),
                None => write!(f, "daemon answered unknown error code {code}"),
            },
            Error::Refused(r) => write!(
                f,
                "{r} (not sent: the daemon would answer {})",
                r.code.name()
            ),
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

/// What an error code from the daemon most likely means for this tool's
/// requests; the daemon logs the exact reason of each refusal.
fn explain(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Invalid => "a parameter is not valid (the daemon's log says which, and why)",
        ErrorCode::Range => {
            "a value is outside AWS IoT Core's or the broker's limits (the daemon's log says which)"
        }
        ErrorCode::Busy => "the daemon's outgoing queue is full; try again later",
        ErrorCode::NoMem => {
            "the request is larger than the daemon's bus frame limit, or its tables are full"
        }
        ErrorCode::Unsupported => {
            "the broker takes no QoS 1 or no retained messages, or the daemon has no disk spool"
        }
        ErrorCode::Unauthorized => "the broker refused the message: not authorized",
        ErrorCode::Remote => "the broker refused the message",
        ErrorCode::NoEntry => "no such method or subscription",
        ErrorCode::Parse => "the daemon could not parse the request",
        _ => "see the daemon's log",
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
                print_message(&mut out, topic, payload, *verbose)?;
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
            print_stats(&Object::Map(map))?;
            Ok(0)
        }
    }
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
    let mut writer = conn.writer()?;
    let topic = topic.to_vec();
    // Each line: its number, and `None` if its call was sent or the
    // reason the daemon's own check refused it (not sent); or the error
    // that stopped the writer.
    type Line = (usize, Option<iotcored::service::params::Refusal>);
    let (tx, rx) = mpsc::channel::<Result<Line, Error>>();
    // Not joined: on an early error `main` returns while it may still be
    // blocked on stdin, and the process exits with it.
    thread::spawn(move || {
        let mut input = io::stdin().lock();
        let mut line = Vec::new();
        for line_no in 1.. {
            let sent = match read_line(&mut input, &mut line) {
                Ok(false) => return,
                Ok(true) if trim_line(&line).is_empty() => continue,
                Ok(true) => match publish_request(&topic, trim_line(&line), qos, retain) {
                    // Refused here: reported in its turn, the rest go on.
                    Err(Error::Refused(r)) => Ok((line_no, Some(r))),
                    built => built
                        .and_then(|frame| send(&mut writer, &frame))
                        .map(|()| (line_no, None)),
                },
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
                Ok(Ok(line)) => pending.push_back(line),
                Ok(Err(e)) => writer_error = Some(e),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    writer_done = true;
                    break;
                }
            }
        }
        let Some((line_no, refused_here)) = pending.pop_front() else {
            break;
        };
        let answer = match refused_here {
            Some(r) => Err(Error::Refused(r)),
            None => conn
                .recv(Some(Instant::now() + timeout))
                .and_then(expect_null),
        };
        match answer {
            Ok(()) => published += 1,
            Err(e @ (Error::Daemon(_) | Error::Refused(_))) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_errors_exit_with_ten_plus_the_code_and_name_it() {
        assert_eq!(Error::Daemon(3).status(), 13);
        assert_eq!(Error::Daemon(5).status(), 15);
        assert_eq!(Error::Daemon(18).status(), 28);
        assert_eq!(Error::Daemon(99).status(), 11);
        assert_eq!(Error::Daemon(-1).status(), 11);
        assert_eq!(
            Error::Daemon(3).to_string(),
            "daemon answered BUSY (3): the daemon's outgoing queue is full; try again later"
        );
        assert_eq!(
            Error::Daemon(99).to_string(),
            "daemon answered unknown error code 99"
        );
        assert_eq!(Error::Timeout.status(), EXIT_TIMEOUT);
        assert_eq!(Error::WaitElapsed(2).status(), EXIT_TIMEOUT);
        assert_eq!(Error::Closed.status(), EXIT_ERROR);
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
