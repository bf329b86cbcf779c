//! A hostile local client as a process of its own (its own pid, as the
//! per-process rules of core-bus.md section 7 need): python3 opens `n`
//! connections to a bus socket, writes the same bytes on each (nothing,
//! part of a frame, ...), then holds them, never reading an answer it
//! does not need, and reports on stdout how many are still open each time
//! the daemon closes one. Stopped by its own pid on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::process::{log_stdio, read_log, terminate};
use super::{wait_until, TestDir};

/// The client: connect, write, then report closes until killed. Each line
/// is `open K`: K connections still open.
const SCRIPT: &str = r#"
import select, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
datas = [open(h[1:], "rb").read() if h.startswith("@") else bytes.fromhex(h)
         for h in sys.argv[3:]]
socks = []
for i in range(n):
    data = datas[i % len(datas)]
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError:
        break
    if data:
        s.sendall(data)
    socks.append(s)
alive = set(socks)
print("open", len(alive), flush=True)
deadline = time.time() + 120
while time.time() < deadline:
    if not alive:
        time.sleep(0.2)
        continue
    ready, _, _ = select.select(list(alive), [], [], 0.2)
    for s in ready:
        try:
            got = s.recv(65536)
        except OSError:
            got = b""
        if not got:
            alive.discard(s)
            s.close()
            print("open", len(alive), flush=True)
"#;

/// A process holding bus connections.
pub struct Holder {
    child: Child,
    out: std::path::PathBuf,
    _dir: TestDir,
}

impl Holder {
    /// Opens `n` connections to `socket`, writes `data` on each, and holds
    /// them; returns once they are all open (or refused: closed at once).
    pub fn start(socket: &Path, n: usize, data: &[u8]) -> Holder {
        Holder::start_each(socket, n, &[data.to_vec()])
    }

    /// As `start`, each connection writing the bytes of the file at `path`
    /// (for data too large for a command line).
    pub fn start_file(socket: &Path, n: usize, path: &Path) -> Holder {
        Holder::start_args(socket, n, vec![format!("@{}", path.display())])
    }

    /// As `start`, connection `i` writing `datas[i % datas.len()]`.
    pub fn start_each(socket: &Path, n: usize, datas: &[Vec<u8>]) -> Holder {
        let hex = datas
            .iter()
            .map(|d| d.iter().map(|b| format!("{b:02x}")).collect::<String>())
            .collect();
        Holder::start_args(socket, n, hex)
    }

    /// Starts the script with `datas` as given (hex, or `@path`).
    fn start_args(socket: &Path, n: usize, hex: Vec<String>) -> Holder {
        let dir = TestDir::new("holder");
        let out = dir.join("out.log");
        let (stdout, stderr) = log_stdio(&out);
        let child = Command::new("python3")
            .args(["-c", SCRIPT])
            .arg(socket)
            .arg(n.to_string())
            .args(hex)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("python3 for the hostile client");
        let h = Holder {
            child,
            out,
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_secs(10), || h.open().is_some()),
            "holder did not start: {}",
            read_log(&h.out)
        );
        h
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many of its connections are open now (by its last report).
    pub fn open(&self) -> Option<usize> {
        read_log(&self.out)
            .lines()
            .filter_map(|l| l.strip_prefix("open ")?.trim().parse().ok())
            .next_back()
    }

    /// Waits until at most `n` connections are open.
    pub fn wait_open_at_most(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.open().is_some_and(|k| k <= n))
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}
