//! The throw-away PKI every TLS peer of the tests uses: generated once per
//! test process by `config/dev/gen-pki.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The throw-away PKI from `config/dev/gen-pki.sh`, generated once per test
/// process into `$CARGO_TARGET_TMPDIR/pki` (kept between runs; the script
/// skips work when it is complete and serialises concurrent runs).
pub struct Pki {
    dir: PathBuf,
}

/// Every file gen-pki.sh produces; a missing one forces regeneration.
const PKI_FILES: &[&str] = &[
    "ca.pem",
    "ca.key",
    "server.pem",
    "server.key",
    "client.pem",
    "client.key",
    "client-rsa.pem",
    "client-rsa.key",
    "client-ec-sec1.key",
    "client-p384.pem",
    "client-p384.key",
    "p521.key",
    "client-nonl.pem",
    "client-nonl.key",
    "ca-nonl.pem",
    "client-chain.pem",
    "client-chain.key",
    "client-expired.pem",
    "client-expired.key",
    "untrusted-ca.pem",
    "client-untrusted.pem",
    "client-untrusted.key",
    "server-wronghost.pem",
    "server-wronghost.key",
    "other.key",
];

impl Pki {
    /// The shared PKI, generated on first use.
    pub fn get() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pki");
            run_gen_pki(&dir, false);
            if PKI_FILES.iter().any(|f| !dir.join(f).exists()) {
                // Left by an older version of the script.
                run_gen_pki(&dir, true);
            }
            Pki { dir }
        })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of one file, e.g. `pki.path("client.pem")`; panics if absent.
    pub fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        assert!(p.exists(), "no PKI file {}", p.display());
        p
    }
}

fn run_gen_pki(dir: &Path, force: bool) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dev/gen-pki.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script);
    if force {
        cmd.arg("--force");
    }
    let out = cmd
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
