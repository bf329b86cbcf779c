//! What every guard of a child process is built from: a temporary
//! directory per guard, log files read leniently, searched and waited on
//! ([`Logged`]) and dumped when a test panics, and stopping a child by its
//! own pid (SIGTERM, SIGKILL after [`TERM_GRACE`], then reaped) within a
//! bounded wait.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use super::{wait_until, LOG_TAIL_LINES, TERM_GRACE};

/// A directory under `CARGO_TARGET_TMPDIR`, unique per test process, guard
/// and test (`<test>-<what>-<pid>-<counter>`), removed on drop.
///
/// Names are kept short because the daemon may put Unix sockets here
/// (`sun_path` holds 108 bytes).
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates a fresh directory; `what` names the guard that owns it.
    pub fn new(what: &str) -> TestDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}-{}-{}-{}",
            sanitize(&current_test_name(), 24),
            sanitize(what, 16),
            std::process::id(),
            n
        );
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TestDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The running test's name: libtest names each test's thread after it.
fn current_test_name() -> String {
    let name = thread::current().name().unwrap_or("test").to_string();
    // Keep the function name, drop the module path.
    name.rsplit("::").next().unwrap_or("test").to_string()
}

fn sanitize(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect()
}

/// Reads a log file as text (lossy: client ids and payloads may be any bytes);
/// a missing file reads as empty.
pub(super) fn read_log(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    }
}

/// A guard whose process writes a log file (stdout and stderr): the
/// broker's (every run of it) or the daemon's. Reading, counting and
/// waiting for a needle are the same for both.
pub trait Logged {
    /// The log file.
    fn log_path(&self) -> &Path;

    /// Everything written to the log so far.
    fn log(&self) -> String {
        read_log(self.log_path())
    }

    /// How many times `needle` occurs in the log.
    fn count_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits until the log contains `needle`.
    fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_log_count(needle, 1, timeout)
    }

    /// Waits until the log contains `needle` at least `n` times.
    fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.count_log(needle) >= n)
    }

    /// When the test is already panicking, prints the last lines of the log
    /// to stderr under the title `what`; each guard does as it drops.
    fn dump_tail_if_panicking(&self, what: &str) {
        if thread::panicking() {
            dump_tail(what, self.log_path());
        }
    }
}

/// Prints the last lines of a log to stderr; used by guards dropped in a
/// panicking test (libtest shows a failed test's stderr).
fn dump_tail(what: &str, path: &Path) {
    let text = read_log(path);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    let mut out = format!(
        "----- {what}: {} (last {} lines) -----\n",
        path.display(),
        lines.len() - start
    );
    for line in &lines[start..] {
        let _ = writeln!(out, "{line}");
    }
    out.push_str("-----\n");
    eprint!("{out}");
}

/// Sends `sig` to `pid`.
pub(super) fn send_signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions. The pid is our
        // own unreaped child, so it cannot have been recycled.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Waits up to `timeout` for `child` to exit, reaping it.
pub(super) fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    status
}

/// Stops `child`: SIGTERM, SIGKILL after [`TERM_GRACE`], then reaps it.
pub fn terminate(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    send_signal(child.id(), libc::SIGTERM);
    if let Some(status) = wait_child(child, TERM_GRACE) {
        return Some(status);
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Opens `path` for appending, for a child's stdout and stderr.
pub(super) fn log_stdio(path: &Path) -> (Stdio, Stdio) {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let err = file.try_clone().expect("dup log file");
    (Stdio::from(file), Stdio::from(err))
}

/// Finds a program that may live in an sbin directory not on PATH.
pub(super) fn program(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}
