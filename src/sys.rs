//! Thin OS glue the standard library lacks: termination signals as a file
//! descriptor the event loop can poll, systemd's notifications and socket
//! activation. The crate's only `unsafe` code lives here, each block with
//! its SAFETY note.
//!
//! SIGTERM and SIGINT are blocked in the calling thread (and so in every
//! thread spawned after it) and read from a non-blocking `signalfd`, so a
//! signal is an ordinary event of the single-threaded loop, with no handler
//! running at an arbitrary point.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A non-blocking signalfd for SIGTERM and SIGINT.
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Blocks SIGTERM and SIGINT in this thread and opens a signalfd for them.
    /// Call before spawning threads, so that they inherit the mask.
    pub fn termination() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; the libc calls get valid pointers
        // to it and their results are checked.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Self {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// The next pending signal number, if any.
    pub fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data and the buffer passed to
        // read(2) is exactly its size.
        unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            let n = libc::read(
                self.fd.as_raw_fd(),
                std::ptr::addr_of_mut!(info).cast(),
                size,
            );
            if usize::try_from(n).ok() == Some(size) {
                i32::try_from(info.ssi_signo).ok()
            } else {
                None
            }
        }
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A seed for jitter from the standard library's per-process random keys.
pub fn random_seed() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

/// Fills `buf` from the kernel's random number generator (`getrandom(2)`,
/// which waits only until it is seeded, early at boot).
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, valid for writes;
        // getrandom writes at most that many bytes and the result is
        // checked.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // A kernel before 3.17, or a seccomp filter without it.
                    Some(libc::ENOSYS) => {
                        use std::io::Read;
                        return std::fs::File::open("/dev/urandom")?.read_exact(rest);
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// systemd's readiness protocol (`sd_notify(3)`): datagrams on
/// `$NOTIFY_SOCKET`, written without blocking and without libsystemd.
/// Without `NOTIFY_SOCKET` every call does nothing.
pub struct Notifier {
    socket: Option<(
        std::os::unix::net::UnixDatagram,
        std::os::unix::net::SocketAddr,
    )>,
    watchdog: Option<std::time::Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, and
    /// removes them from the environment so they are used once.
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let addr = notify_addr(&path)?;
            let sock = std::os::unix::net::UnixDatagram::unbound().ok()?;
            sock.set_nonblocking(true).ok()?;
            Some((sock, addr))
        });
        let pid_ok = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .map_or(true, |p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0 && pid_ok)
            .map(std::time::Duration::from_micros);
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(var);
        }
        Self { socket, watchdog }
    }

    /// How often to send `WATCHDOG=1`: half the interval systemd expects.
    pub fn watchdog_interval(&self) -> Option<std::time::Duration> {
        self.socket.as_ref()?;
        // At least a millisecond: the loop's clock counts milliseconds.
        self.watchdog
            .map(|d| (d / 2).max(std::time::Duration::from_millis(1)))
    }

    /// Sends one message (e.g. `READY=1`); failures are ignored, since
    /// systemd may be gone and a lost notification must not stop the loop.
    pub fn notify(&self, message: &str) {
        if let Some((sock, addr)) = &self.socket {
            let _ = sock.send_to_addr(message.as_bytes(), addr);
        }
    }
}

/// The address in `NOTIFY_SOCKET`: a path, or `@name` for the abstract
/// namespace.
fn notify_addr(path: &std::ffi::OsStr) -> Option<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    match bytes.first()? {
        b'@' => std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..]).ok(),
        b'/' => std::os::unix::net::SocketAddr::from_pathname(path).ok(),
        _ => None,
    }
}

/// [bus-sock-3] The listening socket systemd passed for interface `name`,
/// if `LISTEN_PID` is our pid and `LISTEN_FDNAMES` names it. The variables
/// are removed so the fd is taken once.
pub fn activated_listener(name: &str) -> Option<std::os::unix::net::UnixListener> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    if pid != std::process::id() {
        return None;
    }
    let count: usize = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let index = names.split(':').take(count).position(|n| n == name)?;
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    // SD_LISTEN_FDS_START is 3.
    let fd = RawFd::try_from(3 + index).ok()?;
    // SAFETY: systemd passed us this listening socket and nothing else owns
    // it; LISTEN_* are cleared above, so it is taken once.
    Some(unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) })
}

/// The pid of the process at the other end of a connected Unix socket
/// (`SO_PEERCRED`), if the kernel gives one.
pub fn peer_pid(fd: RawFd) -> Option<u32> {
    let empty = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let cred = socket_option(fd, libc::SO_PEERCRED, empty)?;
    u32::try_from(cred.pid).ok().filter(|&pid| pid > 0)
}

/// How many bytes the kernel holds unread on a connected socket
/// (`FIONREAD`); 0 when it cannot tell.
pub fn unread_bytes(fd: RawFd) -> usize {
    ioctl_int(fd, libc::FIONREAD)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
}

/// A connected socket's send buffer: its size (`SO_SNDBUF`) and what it
/// holds unsent or unread (`SIOCOUTQ`, which for a Unix stream socket
/// counts until the peer reads). `None` when the kernel cannot tell.
pub fn send_buffer(fd: RawFd) -> Option<(usize, usize)> {
    let size = socket_option(fd, libc::SO_SNDBUF, 0 as libc::c_int)?;
    let queued = ioctl_int(fd, libc::TIOCOUTQ)?;
    Some((usize::try_from(size).ok()?, usize::try_from(queued).ok()?))
}

/// A `SOL_SOCKET` option whose value is a plain `T` (an integer or a C
/// struct), read into `value`.
fn socket_option<T>(fd: RawFd, name: libc::c_int, mut value: T) -> Option<T> {
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<T>()).ok()?;
    // SAFETY: `value` and `len` are valid for writes and `len` is the size
    // of `value`; getsockopt writes at most `len` bytes and the result is
    // checked.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            std::ptr::addr_of_mut!(value).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// An `ioctl` that writes one `c_int` (`FIONREAD`, `TIOCOUTQ`).
fn ioctl_int(fd: RawFd, request: libc::Ioctl) -> Option<libc::c_int> {
    let mut n: libc::c_int = 0;
    // SAFETY: these requests write one c_int through the pointer, which is
    // valid for writes; the result is checked.
    let rc = unsafe { libc::ioctl(fd, request, std::ptr::addr_of_mut!(n)) };
    (rc == 0).then_some(n)
}

/// Takes an exclusive, non-blocking `flock` on `fd`: held until the file
/// is closed, so a second daemon on the same spool directory is refused.
pub fn lock_exclusive(fd: RawFd) -> io::Result<()> {
    // SAFETY: flock takes a descriptor and flags; the result is checked.
    let rc = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Allocates `len` bytes of `fd`'s file on disk now (`fallocate`), so a
/// full disk is found here, not at a later write.
pub fn allocate(fd: RawFd, len: u64) -> io::Result<()> {
    // The 64-bit call, so 32-bit ARM takes sizes up to 4 GiB too.
    let len = libc::off64_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "size too large"))?;
    // SAFETY: fallocate64 takes a descriptor, mode 0 and a range; the
    // result is checked.
    let rc = unsafe { libc::fallocate64(fd, 0, 0, len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Ignores SIGXFSZ, so a write or an allocation past the file size limit
/// (`RLIMIT_FSIZE`) fails with EFBIG, reported, instead of killing the
/// daemon.
pub fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no handler to
    // run; the previous disposition is not needed.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
