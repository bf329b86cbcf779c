//! A fault-injecting TCP proxy between the daemon and the broker: cuts (FIN
//! or RST), blackholes and refusals on demand. Its threads poll every
//! [`POLL`], so a control takes effect within tens of milliseconds and drop
//! joins every thread in bounded time.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::net::{bind_nonblocking, is_timeout};
use super::{lock, wait_until, POLL};

/// How [`Proxy::cut`] closes connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// An orderly close: both peers read end-of-stream.
    Fin,
    /// An abortive close (SO_LINGER 0): both peers see ECONNRESET.
    Rst,
}

/// A TCP proxy 127.0.0.1:`port()` → 127.0.0.1:target, with faults on demand.
///
/// One accept thread plus two pump threads per connection; they poll every
/// 10 ms, so controls take effect within a few tens of milliseconds and
/// drop joins them all in bounded time.
pub struct Proxy {
    port: u16,
    shared: Arc<ProxyShared>,
    accept_thread: Option<JoinHandle<()>>,
}

struct ProxyShared {
    target: u16,
    listener: Mutex<Option<TcpListener>>,
    conns: Mutex<Vec<ProxyConn>>,
    stop: AtomicBool,
    blackhole: AtomicBool,
    accepted: AtomicUsize,
}

struct ProxyConn {
    link: Arc<Link>,
    pumps: Vec<JoinHandle<()>>,
}

/// The two sockets of one proxied connection; they close when the last
/// owner (the registry or a pump) drops its `Arc`.
struct Link {
    client: TcpStream,
    upstream: TcpStream,
    closed: AtomicBool,
}

impl Proxy {
    /// Proxies a newly bound free port to 127.0.0.1:`target_port`.
    pub fn start(target_port: u16) -> Proxy {
        Proxy::start_on(0, target_port)
    }

    /// Proxies 127.0.0.1:`listen_port` (0: any free port) to 127.0.0.1:`target_port`.
    pub fn start_on(listen_port: u16, target_port: u16) -> Proxy {
        let listener = bind_nonblocking(listen_port)
            .unwrap_or_else(|e| panic!("proxy cannot bind 127.0.0.1:{listen_port}: {e}"));
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(ProxyShared {
            target: target_port,
            listener: Mutex::new(Some(listener)),
            conns: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            blackhole: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || proxy_accept_loop(&accept_shared))
            .expect("spawn proxy thread");
        Proxy {
            port,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far (including ones whose upstream connect failed).
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections currently open.
    pub fn live_connections(&self) -> usize {
        lock(&self.shared.conns)
            .iter()
            .filter(|c| !c.link.closed.load(Ordering::SeqCst))
            .count()
    }

    /// Closes every live connection on both sides and returns once the
    /// sockets are closed. New connections are still accepted.
    pub fn cut(&self, how: Cut) {
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        close_conns(conns, how);
    }

    /// While on, no byte is forwarded in either direction; sockets stay open
    /// and bytes already read are held, then delivered when turned off (like
    /// a network partition that heals before TCP gives up). New connections
    /// are still accepted and held the same way.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// While on, the listening socket is closed, so connects get
    /// ECONNREFUSED; turning it off binds the same port again (std sets
    /// SO_REUSEADDR). Established connections are not touched.
    pub fn refuse(&self, on: bool) {
        let mut listener = lock(&self.shared.listener);
        if on {
            *listener = None;
        } else if listener.is_none() {
            let mut last = None;
            let bound = wait_until(Duration::from_secs(2), || {
                match bind_nonblocking(self.port) {
                    Ok(l) => {
                        *listener = Some(l);
                        true
                    }
                    Err(e) => {
                        last = Some(e);
                        false
                    }
                }
            });
            assert!(bound, "proxy cannot re-bind port {}: {last:?}", self.port);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        *lock(&self.shared.listener) = None;
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        close_conns(conns, Cut::Fin);
    }
}

/// Sets SO_LINGER to {on, 0 s}, so the last close sends RST instead of FIN.
fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is open for the lifetime of `s`; the option value is a
    // properly sized `linger` on the stack.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(linger).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).unwrap_or(8),
        );
    }
}

fn close_conns(conns: Vec<ProxyConn>, how: Cut) {
    for c in &conns {
        match how {
            Cut::Fin => {
                let _ = c.link.client.shutdown(Shutdown::Both);
                let _ = c.link.upstream.shutdown(Shutdown::Both);
            }
            Cut::Rst => {
                set_linger_zero(&c.link.client);
                set_linger_zero(&c.link.upstream);
            }
        }
        c.link.closed.store(true, Ordering::SeqCst);
    }
    for c in conns {
        for p in c.pumps {
            let _ = p.join();
        }
        // Dropping the last Arc closes both sockets here.
    }
}

fn proxy_accept_loop(shared: &Arc<ProxyShared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let accepted = lock(&shared.listener).as_ref().map(TcpListener::accept);
        match accepted {
            Some(Ok((client, _))) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                proxy_open(shared, client);
            }
            Some(Err(_)) | None => thread::sleep(POLL / 2),
        }
        // Forget connections whose pumps are done, closing their sockets.
        let mut conns = lock(&shared.conns);
        conns.retain(|c| !c.pumps.iter().all(JoinHandle::is_finished));
    }
}

fn proxy_open(shared: &Arc<ProxyShared>, client: TcpStream) {
    let target = SocketAddr::from(([127, 0, 0, 1], shared.target));
    let Ok(upstream) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
        // As if the far end refused: the client sees its connection close.
        return;
    };
    for s in [&client, &upstream] {
        let _ = s.set_nonblocking(false);
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(POLL));
        let _ = s.set_write_timeout(Some(POLL));
    }
    let link = Arc::new(Link {
        client,
        upstream,
        closed: AtomicBool::new(false),
    });
    // Registered before any byte flows, so a cut() after a round trip
    // always finds it.
    let mut conns = lock(&shared.conns);
    let mut pumps = Vec::new();
    for upward in [true, false] {
        let link = Arc::clone(&link);
        let shared = Arc::clone(shared);
        let name = if upward { "proxy-up" } else { "proxy-down" };
        let pump = thread::Builder::new()
            .name(name.into())
            .spawn(move || proxy_pump(&shared, &link, upward))
            .expect("spawn proxy pump");
        pumps.push(pump);
    }
    conns.push(ProxyConn { link, pumps });
}

/// Copies one direction of a connection until end-of-stream, an error, a
/// cut or the proxy's drop.
fn proxy_pump(shared: &ProxyShared, link: &Link, upward: bool) {
    let (from, to) = if upward {
        (&link.client, &link.upstream)
    } else {
        (&link.upstream, &link.client)
    };
    let done = || link.closed.load(Ordering::SeqCst) || shared.stop.load(Ordering::SeqCst);
    let mut buf = vec![0u8; 16 * 1024];
    while !done() {
        if shared.blackhole.load(Ordering::SeqCst) {
            thread::sleep(POLL / 2);
            continue;
        }
        let n = match (&*from).read(&mut buf) {
            Ok(0) => {
                // Pass the half-close on; the other direction keeps going.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if is_timeout(&e) => continue,
            Err(_) => {
                // A reset (or worse) on one side: reset the other one too.
                set_linger_zero(to);
                link.closed.store(true, Ordering::SeqCst);
                return;
            }
        };
        // Bytes read just as a blackhole began are held until it ends.
        while shared.blackhole.load(Ordering::SeqCst) && !done() {
            thread::sleep(POLL / 2);
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            if done() {
                return;
            }
            match (&*to).write(rest) {
                Ok(0) => break,
                Ok(k) => rest = &rest[k..],
                Err(e) if is_timeout(&e) => {}
                Err(_) => {
                    set_linger_zero(from);
                    link.closed.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}
