//! Thin OS glue the standard library lacks: termination signals as a file
//! descriptor the event loop can poll.
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
