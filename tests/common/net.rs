//! Sockets on 127.0.0.1 shared by the guards: a free port, whether a port
//! listens (without connecting to it), a non-blocking listener, and which
//! I/O errors only mean "nothing yet".

use std::fs;
use std::io;
use std::net::TcpListener;

/// A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read,
/// close). Racy by nature; prefer guards that bind port 0 themselves.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Whether some socket listens on 127.0.0.1:`port` (or on any address),
/// read from /proc/net/tcp without connecting, so broker logs stay clean.
/// `None` if /proc is unavailable.
pub(super) fn tcp_listening(port: u16) -> Option<bool> {
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    let want = [
        format!("0100007F:{port:04X}"),
        format!("00000000:{port:04X}"),
    ];
    Some(table.lines().skip(1).any(|line| {
        let mut cols = line.split_whitespace();
        let local = cols.nth(1).unwrap_or("");
        let state = cols.nth(1).unwrap_or("");
        state == "0A" && want.iter().any(|w| w == local)
    }))
}

/// A non-blocking listener on 127.0.0.1:`port` (0: any free port).
pub(super) fn bind_nonblocking(port: u16) -> io::Result<TcpListener> {
    let l = TcpListener::bind(("127.0.0.1", port))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Whether an error of a socket with a timeout (or a non-blocking one)
/// only means that nothing happened yet.
pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}
