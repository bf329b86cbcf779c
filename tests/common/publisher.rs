//! A local publisher as a process of its own (its own pid, for the
//! per-process lanes of core-bus.md section 7): `iotcorectl pub -l`, which
//! publishes each line written to its stdin as one message, pipelined on one
//! connection. Stopped by its own pid on drop.

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use super::process::{log_stdio, read_log, terminate};
use super::TestDir;

/// A running `iotcorectl pub -l`.
pub struct LinePublisher {
    child: Child,
    stdin: Option<ChildStdin>,
    out: std::path::PathBuf,
    _dir: TestDir,
}

impl LinePublisher {
    /// Starts publishing to `topic` at `qos` through the daemon whose bus
    /// socket is `socket`.
    pub fn start(socket: &Path, topic: &str, qos: u8) -> LinePublisher {
        let dir = TestDir::new("publisher");
        let out = dir.join("out.log");
        let (stdout, stderr) = log_stdio(&out);
        let socket_dir = socket.parent().expect("socket directory");
        let name = socket.file_name().expect("socket name");
        let mut child = Command::new(env!("CARGO_BIN_EXE_iotcorectl"))
            .arg("--socket-dir")
            .arg(socket_dir)
            .arg("-n")
            .arg(name)
            .args(["pub", "-l", "-t", topic, "-q", &qos.to_string()])
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn iotcorectl pub -l");
        let stdin = child.stdin.take();
        LinePublisher {
            child,
            stdin,
            out,
            _dir: dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Publishes `lines`, one message each.
    pub fn send(&mut self, lines: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin
            .write_all(lines.as_bytes())
            .expect("write to iotcorectl");
        stdin.flush().expect("flush to iotcorectl");
    }

    /// What it printed so far (errors, the count at the end).
    pub fn output(&self) -> String {
        read_log(&self.out)
    }
}

impl Drop for LinePublisher {
    fn drop(&mut self) {
        drop(self.stdin.take());
        terminate(&mut self.child);
    }
}
