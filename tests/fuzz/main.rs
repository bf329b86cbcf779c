//! Fuzzing on stable Rust: every decoder that takes outside bytes, fed a
//! seeded mutator over a corpus of valid inputs [iotcored-robustness].
//!
//! Targets: bus frames (and the request headers and parameters behind
//! them), bus objects, MQTT 3.1.1 and 5 packets, MQTT 5 property blocks,
//! the MQTT session fed a broker's packets, the disk spool's records and
//! its journal (header slots and record ring). A case fails on a panic, on
//! a hang (no progress for `FUZZ_HANG_SECONDS`, default 10) or on a
//! non-canonical round trip: what a decoder accepts, its encoder writes,
//! and that decodes to the same thing and encodes to the same bytes.
//!
//! Without settings this is the short fixed-seed pass `make test` runs
//! (`cargo test --test fuzz`). `make fuzz` runs it in release with
//! `FUZZ_CASES` per target (default 10^7) or `FUZZ_SECONDS`, `FUZZ_SEED`
//! (default: fixed; `random` for a new one, printed) and `FUZZ_TARGET`
//! (one target by name). A failing input is written to
//! `target/fuzz/<target>-<seed>-<case>.bin` and printed in hex, with the
//! settings that reproduce it.

// Inputs are at most 64 KiB and counts fit everywhere: the casts of a
// harness, not of the daemon.
#![allow(clippy::cast_possible_truncation)]

mod corpus;
mod mutate;
mod targets;

use std::io::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mutate::{Mutator, Rng};

/// The check of one input: `Ok(true)` accepted, `Ok(false)` refused
/// cleanly, `Err` an invariant broken.
pub type Check = Box<dyn FnMut(&[u8]) -> Result<bool, String>>;

/// A fuzz target: its corpus and the check of one input.
pub struct Target {
    pub name: &'static str,
    pub corpus: Vec<Vec<u8>>,
    /// Decodes `input`: `Ok(true)` accepted, `Ok(false)` refused (cleanly),
    /// `Err` an invariant broken (the message says which).
    pub run: Check,
    /// Fixes what no mutation should usually break (lengths, CRCs), on
    /// most cases, so that the decoder's deeper layers are reached.
    pub fixup: Option<fn(&mut Vec<u8>, &mut Rng)>,
    /// A case costs about a thousand of the others' (the journal opens a
    /// 1 MiB file): the short pass runs a tenth as many.
    pub slow: bool,
}

/// The short pass: cases per target when nothing is set.
const SHORT_CASES: u64 = 20_000;
/// `FUZZ_SEED` when not set: the short pass is the same on every run.
const FIXED_SEED: u64 = 0x10c0_7ed5_eed5_f00d;

struct Settings {
    seconds: Option<u64>,
    cases: Option<u64>,
    seed: u64,
    only: Option<String>,
    hang: Duration,
}

fn settings() -> Settings {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let num = |k: &str| {
        var(k).map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{k}={v:?} is not a number"))
        })
    };
    let seed = match var("FUZZ_SEED").as_deref() {
        None => FIXED_SEED,
        Some("random") => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64);
            t ^ u64::from(std::process::id()).rotate_left(32)
        }
        Some(v) => {
            let v = v.trim_start_matches("0x");
            u64::from_str_radix(v, 16).unwrap_or_else(|_| panic!("FUZZ_SEED={v:?}: hex"))
        }
    };
    Settings {
        seconds: num("FUZZ_SECONDS"),
        cases: num("FUZZ_CASES"),
        seed,
        only: var("FUZZ_TARGET"),
        hang: Duration::from_secs(num("FUZZ_HANG_SECONDS").unwrap_or(10)),
    }
}

fn main() {
    let s = settings();
    let (seconds, cases) = match (s.seconds, s.cases) {
        (None, None) => (None, Some(SHORT_CASES)),
        other => other,
    };
    println!(
        "fuzz: seed {:016x}; {} per target",
        s.seed,
        match (seconds, cases) {
            (Some(t), Some(n)) => format!("{n} cases or {t} s"),
            (Some(t), None) => format!("{t} s"),
            (None, Some(n)) => format!("{n} cases"),
            (None, None) => unreachable!(),
        }
    );

    // The watchdog: a case that does not finish within `hang` is a hang.
    let progress = Arc::new(AtomicU64::new(0));
    let current: Arc<Mutex<(String, Vec<u8>)>> = Arc::new(Mutex::new((String::new(), Vec::new())));
    let done = Arc::new(AtomicBool::new(false));
    {
        let (progress, current, done, hang, seed) = (
            progress.clone(),
            current.clone(),
            done.clone(),
            s.hang,
            s.seed,
        );
        std::thread::spawn(move || {
            let mut last = u64::MAX;
            let mut since = Instant::now();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let now = progress.load(Ordering::Relaxed);
                if now != last {
                    last = now;
                    since = Instant::now();
                } else if since.elapsed() > hang {
                    let (name, input) = current.lock().map(|c| c.clone()).unwrap_or_default();
                    fail(
                        &name,
                        seed,
                        now,
                        &input,
                        &format!("hang: no progress for {hang:?}"),
                    );
                }
            }
        });
    }

    let mut failed = false;
    let mut total = 0u64;
    for mut target in targets::all() {
        if s.only.as_deref().is_some_and(|o| o != target.name) {
            continue;
        }
        // Every corpus entry must be accepted: a corpus the decoder refuses
        // would fuzz nothing but its first check.
        for (i, input) in target.corpus.iter().enumerate() {
            match (target.run)(input) {
                Ok(true) => {}
                Ok(false) => panic!("{}: corpus entry {i} is refused: {input:02x?}", target.name),
                Err(e) => panic!("{}: corpus entry {i}: {e}: {input:02x?}", target.name),
            }
        }
        let seed = s.seed ^ fnv(target.name);
        let mut m = Mutator::new(seed);
        let started = Instant::now();
        let deadline = seconds.map(|t| started + Duration::from_secs(t));
        let cases = match (cases, s.cases) {
            (Some(c), None) if target.slow => Some(c / 10),
            (c, _) => c,
        };
        let mut accepted = 0u64;
        let mut n = 0u64;
        let mut input = Vec::with_capacity(4096);
        loop {
            if cases.is_some_and(|c| n >= c) {
                break;
            }
            if n % 1024 == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            m.next_input(&target.corpus, &mut input);
            if let Some(fix) = target.fixup {
                if m.rng.below(10) < 7 {
                    fix(&mut input, &mut m.rng);
                }
            }
            if n % 64 == 0 {
                if let Ok(mut c) = current.lock() {
                    c.0.clear();
                    c.0.push_str(target.name);
                    c.1.clear();
                    c.1.extend_from_slice(&input);
                }
            }
            let result = catch_unwind(AssertUnwindSafe(|| (target.run)(&input)));
            match result {
                Ok(Ok(true)) => accepted += 1,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    fail(target.name, s.seed, n, &input, &e);
                }
                Err(_) => fail(target.name, s.seed, n, &input, "panic (message above)"),
            }
            n += 1;
            progress.store(total + n, Ordering::Relaxed);
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        println!(
            "fuzz: {:<14} {:>11} cases in {:>6.1} s, {:>9.0}/s, {:>5.1} % accepted, corpus {}",
            target.name,
            n,
            secs,
            n as f64 / secs,
            100.0 * accepted as f64 / n.max(1) as f64,
            target.corpus.len()
        );
        if accepted == 0 {
            println!("fuzz: {}: no mutated input was accepted", target.name);
            failed = true;
        }
        total += n;
    }
    done.store(true, Ordering::Relaxed);
    if failed {
        std::process::exit(1);
    }
    println!("fuzz: {total} cases, no failure");
}

/// Writes the input, says how to reproduce it, and exits 1.
fn fail(name: &str, seed: u64, case: u64, input: &[u8], what: &str) -> ! {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("..")
        .join("fuzz");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{name}-{seed:016x}-{case}.bin"));
    // `case` counts from 0: FUZZ_CASES=case+1 runs up to and including it.
    let _ = std::fs::write(&path, input);
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "fuzz: {name}: case {case}: {what}\n  input ({} bytes, saved to {}): {}\n  \
         reproduce: FUZZ_TARGET={name} FUZZ_SEED={seed:016x} FUZZ_CASES={} \
         cargo test --test fuzz",
        input.len(),
        path.display(),
        input.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        case + 1
    );
    std::process::exit(1);
}

/// FNV-1a of a name: each target has a seed of its own.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
