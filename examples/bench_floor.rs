//! The floor of the bench's "one connection per call" row: the least a core
//! bus server must do for a client that connects, sends one request and
//! closes, so that the daemon's CPU per such call has something to be
//! compared with on the same machine in the same run.
//!
//! `bench_floor SOCKET`: one thread, one `mio::Poll`, a Unix socket. Per
//! connection it accepts, reads one frame (its length from the first 4
//! bytes, nothing parsed), writes the null call result
//! (core-bus.md §2-3) and closes. Like the daemon it reads right after
//! accepting; unlike it, it registers a connection with epoll only when
//! that read finds nothing yet. Not shipped: an
//! example, built by `make bench`. It exits after `LIFETIME` at the
//! latest; the bench stops it by its pid.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};

/// A call result whose payload is the null object: total length 17, no
/// headers, prelude CRC, payload `00`, message CRC.
const NULL_RESULT: [u8; 17] = [
    0x00, 0x00, 0x00, 0x11, 0x00, 0x00, 0x00, 0x00, 0x38, 0xa2, 0x61, 0x5b, 0x00, 0xa1, 0x71, 0xab,
    0x15,
];
/// Connections open at once; more are closed as soon as they are accepted.
const MAX_CONNECTIONS: usize = 256;
const LISTENER: Token = Token(usize::MAX);
/// How long the process lives if nobody stops it.
const LIFETIME: Duration = Duration::from_secs(600);

/// One connection: bytes of its request read so far, and the frame's
/// length once its first 4 bytes are in.
struct Conn {
    stream: UnixStream,
    prefix: [u8; 4],
    got: usize,
    answering: bool,
    registered: bool,
}

enum Step {
    /// Wait for the next readiness event.
    Wait,
    /// Answered or failed: close.
    Done,
}

impl Conn {
    /// Registers the connection for `interest` the first time it has to
    /// wait (most requests are already there when the connection is
    /// accepted), changes the interest after that.
    fn wait(&mut self, registry: &mio::Registry, token: Token, interest: Interest) -> Step {
        let r = if self.registered {
            registry.reregister(&mut self.stream, token, interest)
        } else {
            registry.register(&mut self.stream, token, interest)
        };
        self.registered = r.is_ok();
        if self.registered {
            Step::Wait
        } else {
            Step::Done
        }
    }

    /// Reads until the frame is complete, then answers; `Wait` on
    /// `WouldBlock` (readiness is edge-triggered: the next event comes).
    fn serve(&mut self, registry: &mio::Registry, token: Token) -> Step {
        let mut scratch = [0u8; 4096];
        while !self.answering {
            // Until the length is known, read what is there: one read
            // takes a whole small request.
            let total = if self.got >= 4 {
                usize::try_from(u32::from_be_bytes(self.prefix))
                    .unwrap_or(usize::MAX)
                    .max(4)
            } else {
                usize::MAX
            };
            if self.got >= total {
                self.answering = true;
                break;
            }
            let want = (total - self.got).min(scratch.len());
            match self.stream.read(&mut scratch[..want]) {
                Ok(0) => return Step::Done,
                Ok(n) => {
                    for (k, b) in scratch[..n].iter().enumerate() {
                        if let Some(p) = self.prefix.get_mut(self.got + k) {
                            *p = *b;
                        }
                    }
                    self.got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.wait(registry, token, Interest::READABLE)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Done,
            }
        }
        loop {
            match self.stream.write(&NULL_RESULT) {
                // 17 bytes to a fresh Unix socket: all or nothing in practice.
                Ok(_) => return Step::Done,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.wait(registry, token, Interest::WRITABLE)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Done,
            }
        }
    }
}

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: bench_floor SOCKET");
        return ExitCode::from(2);
    };
    match run(&path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_floor: {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut listener = UnixListener::bind(path)?;
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut conns: Vec<Option<Conn>> = (0..MAX_CONNECTIONS).map(|_| None).collect();
    let mut free: Vec<usize> = (0..MAX_CONNECTIONS).rev().collect();
    let mut events = Events::with_capacity(256);
    let end = Instant::now() + LIFETIME;
    loop {
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        match poll.poll(&mut events, Some(end - now)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in &events {
            let token = event.token();
            if token == LISTENER {
                loop {
                    let stream = match listener.accept() {
                        Ok((s, _)) => s,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    };
                    let Some(i) = free.pop() else {
                        continue; // full: dropped, so closed
                    };
                    let token = Token(i);
                    let mut conn = Conn {
                        stream,
                        prefix: [0; 4],
                        got: 0,
                        answering: false,
                        registered: false,
                    };
                    match conn.serve(poll.registry(), token) {
                        Step::Wait => conns[i] = Some(conn),
                        Step::Done => free.push(i), // closed on drop
                    }
                }
                continue;
            }
            let i = token.0;
            let Some(conn) = conns.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            if let Step::Done = conn.serve(poll.registry(), token) {
                // Closing the descriptor also removes it from the epoll set.
                conns[i] = None;
                free.push(i);
            }
        }
    }
}
