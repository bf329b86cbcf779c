//! Numbers, text and the report: units, the JSON written to
//! `target/bench/report.json`, and the targets table.

use super::*;

pub(crate) fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

pub(crate) fn as_f64(n: usize) -> f64 {
    n as f64
}

pub(crate) fn ratio(avg: f64, limit: usize) -> f64 {
    if limit == 0 {
        0.0
    } else {
        avg / as_f64(limit)
    }
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

pub(crate) fn kib_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub(crate) fn ggl_rss_ratio(kib: u64) -> String {
    format!(
        "GGL C 7.2 MB: ×{:.2}",
        (kib as f64 * 1024.0) / GGL_RSS_BYTES
    )
}

pub(crate) fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("?".into(), |v| format!("{v:.decimals$}"))
}

pub(crate) fn rss_range(samples: &[u64]) -> String {
    match (samples.iter().min(), samples.iter().max()) {
        (Some(lo), Some(hi)) => format!("{lo}–{hi} KiB over {} samples", samples.len()),
        _ => "no samples".into(),
    }
}

pub(crate) fn samples_json(samples: &[u64]) -> J {
    match (samples.iter().min(), samples.iter().max()) {
        (Some(lo), Some(hi)) => J::Arr(vec![ju(*lo), ju(*hi)]),
        _ => J::Null,
    }
}

/// Writes `text` to `target/bench/<name>` for a closer look; a failure is
/// only printed.
pub(crate) fn save_artifact(name: &str, text: &str) {
    let dir = Path::new(MANIFEST_DIR).join(REPORT_DIR);
    if let Err(e) = fs::create_dir_all(&dir).and_then(|()| fs::write(dir.join(name), text)) {
        println!("  cannot write {}: {e}", dir.join(name).display());
    }
}

/// A file's modification time, to notice a rebuild during the run.
pub(crate) fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub(crate) fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------
// The report

/// A JSON value, written by hand (no serde in this crate).
pub(crate) enum J {
    Null,
    Bool(bool),
    Int(i64),
    Num(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

pub(crate) fn obj(entries: Vec<(&str, J)>) -> J {
    J::Obj(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

pub(crate) fn ju(n: u64) -> J {
    J::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

impl J {
    pub(crate) fn write(&self, out: &mut String, indent: usize) {
        let pad = "  ".repeat(indent + 1);
        let end = "  ".repeat(indent);
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Int(i) => {
                let _ = write!(out, "{i}");
            }
            J::Num(f) if f.is_finite() => {
                let _ = write!(out, "{}", (f * 1000.0).round() / 1000.0);
            }
            J::Num(_) => out.push_str("null"),
            J::Str(s) => write_json_str(out, s),
            J::Arr(items) if items.iter().all(|i| matches!(i, J::Int(_) | J::Num(_))) => {
                out.push('[');
                for (n, item) in items.iter().enumerate() {
                    if n > 0 {
                        out.push_str(", ");
                    }
                    item.write(out, indent + 1);
                }
                out.push(']');
            }
            J::Arr(items) => {
                out.push_str("[\n");
                for (n, item) in items.iter().enumerate() {
                    out.push_str(&pad);
                    item.write(out, indent + 1);
                    out.push_str(if n + 1 < items.len() { ",\n" } else { "\n" });
                }
                out.push_str(&end);
                out.push(']');
            }
            J::Obj(entries) => {
                out.push_str("{\n");
                for (n, (k, v)) in entries.iter().enumerate() {
                    out.push_str(&pad);
                    write_json_str(out, k);
                    out.push_str(": ");
                    v.write(out, indent + 1);
                    out.push_str(if n + 1 < entries.len() { ",\n" } else { "\n" });
                }
                out.push_str(&end);
                out.push('}');
            }
        }
    }
}

pub(crate) fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

pub(crate) struct Target {
    pub(crate) what: String,
    pub(crate) measured: String,
    pub(crate) target: String,
    pub(crate) pass: bool,
    pub(crate) note: String,
}

/// What the sections found: JSON entries, targets, and sections that broke.
#[derive(Default)]
pub(crate) struct Report {
    pub(crate) json: Vec<(String, J)>,
    pub(crate) targets: Vec<Target>,
    pub(crate) errors: Vec<String>,
}

impl Report {
    /// Runs one section; a panic inside it is reported (its guards have
    /// stopped their processes while unwinding) and the next one runs.
    /// `key` selects it in `BENCH_ONLY` (an empty key always runs; a
    /// comma-separated key runs when any of its keys is selected).
    pub(crate) fn section<T>(
        &mut self,
        key: &str,
        name: &str,
        f: impl FnOnce(&mut Report) -> T,
    ) -> Option<T> {
        if let Ok(only) = std::env::var(ONLY_VAR) {
            let selected = |k: &str| only.split(',').any(|o| o.trim() == k);
            if !key.is_empty() && !key.split(',').any(selected) {
                return None;
            }
        }
        println!("\n== {name} ==");
        let t = Instant::now();
        let result = panic::catch_unwind(AssertUnwindSafe(|| f(self)));
        match result {
            Ok(v) => {
                println!("  ({:.1} s)", t.elapsed().as_secs_f64());
                Some(v)
            }
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_string()))
                    .unwrap_or_else(|| "panic".into());
                println!("  SECTION FAILED: {msg}");
                self.errors.push(format!("{name}: {msg}"));
                None
            }
        }
    }

    pub(crate) fn json(&mut self, key: &str, value: J) {
        self.json.push((key.into(), value));
    }

    /// Appends to the array `key`, creating it.
    pub(crate) fn push_json(&mut self, key: &str, value: J) {
        if let Some((_, J::Arr(items))) = self.json.iter_mut().find(|(k, _)| k == key) {
            items.push(value);
        } else {
            self.json.push((key.into(), J::Arr(vec![value])));
        }
    }

    pub(crate) fn target(
        &mut self,
        what: &str,
        measured: String,
        target: &str,
        pass: bool,
        note: String,
    ) {
        self.targets.push(Target {
            what: what.into(),
            measured,
            target: target.into(),
            pass,
            note,
        });
    }

    /// Prints the summary, writes the JSON file, and gives the exit status.
    pub(crate) fn finish(mut self) -> ExitCode {
        println!("\n== Summary ==");
        let w = self.targets.iter().map(|t| t.what.len()).max().unwrap_or(0);
        let m = self
            .targets
            .iter()
            .map(|t| t.measured.chars().count())
            .max()
            .unwrap_or(0);
        for t in &self.targets {
            println!(
                "  {:<w$}  {:>m$}  {:<34} {}  {}",
                t.what,
                t.measured,
                format!("(target {})", t.target),
                if t.pass { "PASS" } else { "MISS" },
                t.note
            );
        }
        println!(
            "  reference, Greengrass Lite's C iotcored on these machines: 7.2 MB RSS, \
             ~{GGL_CPU_US:.0} µs CPU per QoS 0 publish"
        );
        let missed = self.targets.iter().filter(|t| !t.pass).count();
        println!(
            "  {} targets, {} met, {missed} missed",
            self.targets.len(),
            self.targets.len() - missed
        );
        for e in &self.errors {
            println!("  BROKEN: {e}");
        }
        let targets = J::Arr(
            self.targets
                .iter()
                .map(|t| {
                    obj(vec![
                        ("what", J::Str(t.what.clone())),
                        ("measured", J::Str(t.measured.clone())),
                        ("target", J::Str(t.target.clone())),
                        ("pass", J::Bool(t.pass)),
                        ("note", J::Str(t.note.clone())),
                    ])
                })
                .collect(),
        );
        self.json.push(("targets".into(), targets));
        self.json.push((
            "reference_ggl_c_iotcored".into(),
            obj(vec![
                ("rss_bytes", J::Num(GGL_RSS_BYTES)),
                ("cpu_us_per_qos0_publish", J::Num(GGL_CPU_US)),
            ]),
        ));
        self.json.push((
            "errors".into(),
            J::Arr(self.errors.iter().map(|e| J::Str(e.clone())).collect()),
        ));
        let mut text = String::new();
        J::Obj(std::mem::take(&mut self.json)).write(&mut text, 0);
        text.push('\n');
        let path = Path::new(MANIFEST_DIR).join(REPORT_DIR).join("report.json");
        match fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))
            .and_then(|()| fs::write(&path, text))
        {
            Ok(()) => println!("  figures written to {}", path.display()),
            Err(e) => {
                println!("  cannot write {}: {e}", path.display());
                self.errors.push("report".into());
            }
        }
        if self.errors.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}
