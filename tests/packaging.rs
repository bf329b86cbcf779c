//! Packaging checks: the Yocto crate list against Cargo.lock, the Yocto and
//! Buildroot capacity options against build.rs, the systemd units through
//! `systemd-analyze verify`, the sysusers.d file through `systemd-sysusers`,
//! and `make install`.
//!
//! Needs `systemd-analyze` and `systemd-sysusers` (Debian package `systemd`;
//! .ci/run installs it) and `make`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_iotcored");
const CTL: &str = env!("CARGO_BIN_EXE_iotcorectl");

fn read(rel: &str) -> String {
    let path = Path::new(ROOT).join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A fresh directory under CARGO_TARGET_TMPDIR, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("packaging-{what}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs a tool; a missing one fails the test with what to install.
fn run(cmd: &mut Command, package: &str) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {program}: {e}; install the Debian package `{package}` (apt-get install -y {package})")
    })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------
// (a) Cargo.lock and config/yocto/iotcored-crates.inc

/// `(name, version, checksum)` of every crates.io package in Cargo.lock.
fn locked_crates() -> BTreeSet<(String, String, String)> {
    let lock = read("Cargo.lock");
    let mut crates = BTreeSet::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |key: &str| {
            block.lines().find_map(|line| {
                let rest = line.strip_prefix(key)?.strip_prefix(" = \"")?;
                Some(rest.strip_suffix('"')?.to_string())
            })
        };
        let name = field("name").expect("a package without a name in Cargo.lock");
        let Some(source) = field("source") else {
            continue; // the workspace's own package
        };
        if !source.starts_with("registry+") || !source.contains("crates.io") {
            continue;
        }
        let version = field("version").expect("a package without a version");
        let checksum = field("checksum")
            .unwrap_or_else(|| panic!("{name} {version} has no checksum in Cargo.lock"));
        crates.insert((name, version, checksum));
    }
    assert!(!crates.is_empty(), "no crates.io package in Cargo.lock");
    crates
}

/// `(name, version, checksum)` as the .inc gives them: each
/// `crate://crates.io/NAME/VERSION;name=KEY` joined with its
/// `SRC_URI[KEY.sha256sum]`.
fn yocto_crates(inc: &str) -> Result<BTreeSet<(String, String, String)>, String> {
    let mut sums: BTreeMap<String, String> = BTreeMap::new();
    for line in inc.lines() {
        let Some(rest) = line.trim().strip_prefix("SRC_URI[") else {
            continue;
        };
        let (key, value) = rest
            .split_once(".sha256sum] = \"")
            .ok_or_else(|| format!("unexpected line: {line}"))?;
        let value = value.trim_end_matches('"').to_string();
        if sums.insert(key.to_string(), value).is_some() {
            return Err(format!("two checksums for {key}"));
        }
    }
    let mut crates = BTreeSet::new();
    let mut used = BTreeSet::new();
    for word in inc.split_whitespace() {
        let Some(rest) = word.strip_prefix("crate://crates.io/") else {
            continue;
        };
        let (path, params) = rest.split_once(';').unwrap_or((rest, ""));
        let (name, version) = path
            .split_once('/')
            .ok_or_else(|| format!("not crate://crates.io/NAME/VERSION: {word}"))?;
        // Current bitbake names a crate URL after the crate alone unless
        // told otherwise, so the `name=NAME-VERSION` parameter is what ties
        // it to its checksum.
        let key = params
            .split(';')
            .find_map(|p| p.strip_prefix("name="))
            .ok_or_else(|| format!("{word} has no ;name=NAME-VERSION parameter"))?;
        if key != format!("{name}-{version}") {
            return Err(format!("{word}: name={key}, expected {name}-{version}"));
        }
        let sum = sums
            .get(key)
            .ok_or_else(|| format!("no SRC_URI[{key}.sha256sum] for {word}"))?;
        used.insert(key.to_string());
        if !crates.insert((name.to_string(), version.to_string(), sum.clone())) {
            return Err(format!("{word} is listed twice"));
        }
    }
    let unused: Vec<_> = sums.keys().filter(|k| !used.contains(*k)).collect();
    if !unused.is_empty() {
        return Err(format!("checksums without a crate URL: {unused:?}"));
    }
    Ok(crates)
}

#[test]
fn yocto_crate_list_matches_cargo_lock() {
    // A Rust recipe usually breaks this way: Cargo.lock changes and the
    // recipe's crate list does not, and bitbake then fails to fetch, or
    // cargo --frozen fails to build, far from the change that caused it.
    let lock = locked_crates();
    let inc = yocto_crates(&read("config/yocto/iotcored-crates.inc"))
        .unwrap_or_else(|e| panic!("config/yocto/iotcored-crates.inc: {e}"));
    let missing: Vec<_> = lock.difference(&inc).collect();
    let extra: Vec<_> = inc.difference(&lock).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "config/yocto/iotcored-crates.inc disagrees with Cargo.lock; run \
         `python3 config/yocto/gen-crates-inc.py`.\n\
         in Cargo.lock only (name, version, checksum): {missing:?}\n\
         in the .inc only: {extra:?}"
    );
}

#[test]
fn the_crate_list_check_catches_the_usual_mistakes() {
    let good = "SRC_URI += \" \\\n    crate://crates.io/log/0.4.1;name=log-0.4.1 \\\n\"\n\
                SRC_URI[log-0.4.1.sha256sum] = \"ab\"\n";
    let set = yocto_crates(good).unwrap();
    assert!(set.contains(&("log".into(), "0.4.1".into(), "ab".into())));
    // The pre-2024 form without ;name= binds no checksum on current bitbake.
    assert!(yocto_crates(&good.replace(";name=log-0.4.1", "")).is_err());
    // A checksum whose crate is gone.
    assert!(yocto_crates(&format!("{good}SRC_URI[old-1.0.sha256sum] = \"cd\"\n")).is_err());
    // A crate without its checksum.
    assert!(yocto_crates(&good.replace("SRC_URI[log-0.4.1", "SRC_URI[log-0.4.2")).is_err());
}

// ---------------------------------------------------------------------------
// (b) build.rs capacities in the Yocto recipe and Buildroot options

/// One row of build.rs's SETTINGS: (variable, default, minimum, maximum).
#[derive(Debug)]
struct Setting {
    var: String,
    default: u64,
    min: u64,
    max: u64,
}

fn build_rs_settings() -> Vec<Setting> {
    let src = read("build.rs");
    let start = src.find("const SETTINGS").expect("SETTINGS in build.rs");
    let end = start + src[start..].find("];").expect("end of SETTINGS");
    let table = &src[start..end];
    let mut settings = Vec::new();
    for row in table.split('(').skip(1) {
        // ("VAR", "CONST", default, min, max, "meaning"),
        let mut fields = row.splitn(6, ',').map(str::trim);
        let var = fields.next().unwrap_or("").trim_matches('"');
        if !var.starts_with("IOTCORED_") {
            continue;
        }
        let _const = fields.next();
        let mut num = || -> u64 {
            let f = fields.next().unwrap_or("");
            f.replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("build.rs: {var}: not a number: {f:?}"))
        };
        let (default, min, max) = (num(), num(), num());
        settings.push(Setting {
            var: var.to_string(),
            default,
            min,
            max,
        });
    }
    assert!(
        settings.len() >= 10,
        "parsed only {} settings from build.rs: {settings:?}",
        settings.len()
    );
    settings
}

#[test]
fn yocto_recipe_sets_every_capacity_with_build_rs_defaults() {
    let recipe = read("config/yocto/iotcored_0.1.0.bb");
    for s in build_rs_settings() {
        let want = format!("export {} ?= \"{}\"", s.var, s.default);
        assert!(
            recipe.lines().any(|l| l.trim() == want),
            "config/yocto/iotcored_0.1.0.bb lacks `{want}` (build.rs default)"
        );
        let listed = recipe
            .split("IOTCORED_CAPACITIES = \"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("");
        assert!(
            listed.split_whitespace().any(|w| w == s.var),
            "{} is missing from IOTCORED_CAPACITIES (do_compile[vardeps])",
            s.var
        );
    }
    assert!(recipe.contains("do_compile[vardeps] += \"${IOTCORED_CAPACITIES}\""));
}

#[test]
fn buildroot_options_cover_every_capacity_with_build_rs_defaults_and_ranges() {
    let config_in = read("config/buildroot/iotcored/Config.in");
    let mk = read("config/buildroot/iotcored/iotcored.mk");
    for s in build_rs_settings() {
        let option = format!("BR2_PACKAGE_{}", s.var);
        let block = config_in
            .split("\nconfig ")
            .find(|b| b.lines().next().map(str::trim) == Some(option.as_str()))
            .unwrap_or_else(|| panic!("Config.in has no `config {option}`"));
        let has = |line: String| block.lines().any(|l| l.trim() == line);
        assert!(block.contains("\tint \""), "{option} is not an int option");
        assert!(
            has(format!("default {}", s.default)),
            "{option}: want `default {}` (build.rs)",
            s.default
        );
        assert!(
            has(format!("range {} {}", s.min, s.max)),
            "{option}: want `range {} {}` (build.rs)",
            s.min,
            s.max
        );
        let env = format!("{}=$({option})", s.var);
        assert!(
            mk.contains(&env),
            "iotcored.mk's IOTCORED_CARGO_ENV lacks {env}"
        );
    }
    assert!(mk.contains("$(eval $(cargo-package))"));
    assert!(mk.contains("define IOTCORED_INSTALL_INIT_SYSTEMD"));
    assert!(mk.contains("define IOTCORED_USERS"));
}

#[test]
fn yocto_and_buildroot_switch_pkcs11_off_with_no_default_features() {
    // Both packages turn PKCS#11 off with --no-default-features, which is
    // right only while pkcs11 is the one default feature.
    let cargo = read("Cargo.toml");
    assert!(
        cargo.lines().any(|l| l.trim() == "default = [\"pkcs11\"]"),
        "Cargo.toml's default features are no longer just pkcs11: \
         update the recipe and the Buildroot package"
    );
    let recipe = read("config/yocto/iotcored_0.1.0.bb");
    assert!(
        recipe.contains("\nPACKAGECONFIG ??= \"pkcs11\"\n"),
        "{recipe}"
    );
    assert!(
        recipe.contains("\nPACKAGECONFIG[pkcs11] = \",--no-default-features\"\n"),
        "{recipe}"
    );
    let config_in = read("config/buildroot/iotcored/Config.in");
    let block = config_in
        .split("\nconfig ")
        .find(|b| b.starts_with("BR2_PACKAGE_IOTCORED_PKCS11\n"))
        .expect("Config.in has BR2_PACKAGE_IOTCORED_PKCS11");
    assert!(
        block.contains("\tbool \"") && block.contains("\tdefault y\n"),
        "{block}"
    );
    let mk = read("config/buildroot/iotcored/iotcored.mk");
    assert!(
        mk.contains(
            "ifeq ($(BR2_PACKAGE_IOTCORED_PKCS11),)\n\
             IOTCORED_CARGO_BUILD_OPTS += --no-default-features\n\
             IOTCORED_CARGO_INSTALL_OPTS += --no-default-features\n\
             endif"
        ),
        "{mk}"
    );
}

// ---------------------------------------------------------------------------
// (c) systemd-analyze verify, security, and systemd-sysusers

/// The two units in a fresh directory, ExecStart pointing at the built binary.
fn units_in(dir: &Path) -> (PathBuf, PathBuf) {
    let service = read("config/systemd/iotcored.service");
    assert!(service.contains("ExecStart=/usr/bin/iotcored "));
    let service = service.replace("ExecStart=/usr/bin/iotcored ", &format!("ExecStart={BIN} "));
    let s = dir.join("iotcored.service");
    let k = dir.join("iotcored.socket");
    fs::write(&s, service).unwrap();
    fs::write(&k, read("config/systemd/iotcored.socket")).unwrap();
    (s, k)
}

#[test]
fn systemd_analyze_verify_accepts_both_units() {
    let dir = TempDir::new("verify");
    let (service, socket) = units_in(dir.path());
    let out = run(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&socket)
            .arg(&service)
            .current_dir(dir.path()),
        "systemd",
    );
    // Other units of this machine may draw warnings; ours must draw none.
    let ours: Vec<_> = text(&out)
        .lines()
        .filter(|l| l.contains("iotcored"))
        .map(str::to_string)
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify ({}):\n{}",
        out.status,
        text(&out)
    );
}

#[test]
fn systemd_analyze_verify_notices_a_missing_executable() {
    // So the test above means something: verify checks ExecStart.
    let dir = TempDir::new("verify-bad");
    let (service, socket) = units_in(dir.path());
    let body = fs::read_to_string(&service)
        .unwrap()
        .replace(BIN, "/nonexistent/iotcored");
    fs::write(&service, body).unwrap();
    let out = run(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&socket)
            .arg(&service),
        "systemd",
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("/nonexistent/iotcored"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_service_keeps_its_hardening() {
    let dir = TempDir::new("security");
    let (service, _) = units_in(dir.path());
    let out = run(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&service),
        "systemd",
    );
    let all = text(&out);
    let line = all
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{all}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    // 1.2 when written; "OK" ends at 3.9 on systemd-analyze's 0-10 scale.
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{all}");
    let service = read("config/systemd/iotcored.service");
    for line in [
        "Type=notify",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "RestartPreventExitStatus=2 3",
        "User=iotcored",
        "DynamicUser=no",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet=",
    ] {
        assert!(
            service.lines().any(|l| l.trim() == line),
            "iotcored.service lacks `{line}`"
        );
    }
    assert!(
        !service.lines().any(|l| l.starts_with("RuntimeDirectory=")),
        "RuntimeDirectory= would remove /run/greengrass, which the socket unit owns"
    );
    let socket = read("config/systemd/iotcored.socket");
    for line in [
        "ListenStream=/run/greengrass/aws_iot_mqtt",
        "FileDescriptorName=aws_iot_mqtt",
        "SocketMode=0660",
    ] {
        assert!(
            socket.lines().any(|l| l.trim() == line),
            "iotcored.socket lacks `{line}`"
        );
    }
}

#[test]
fn sysusers_file_creates_the_user_and_the_client_group() {
    let root = TempDir::new("sysusers");
    fs::create_dir_all(root.path().join("etc")).unwrap();
    let file = fs::File::open(Path::new(ROOT).join("config/systemd/iotcored.sysusers")).unwrap();
    let out = run(
        Command::new("systemd-sysusers")
            .arg(format!("--root={}", root.path().display()))
            .arg("-")
            .stdin(file),
        "systemd",
    );
    assert!(out.status.success(), "systemd-sysusers: {}", text(&out));
    let passwd = fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let group = fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("iotcored:")),
        "{passwd}"
    );
    assert!(group.lines().any(|l| l.starts_with("iotcored:")), "{group}");
    let socket_group = read("config/systemd/iotcored.socket")
        .lines()
        .find_map(|l| l.strip_prefix("SocketGroup="))
        .expect("SocketGroup= in iotcored.socket")
        .trim()
        .to_string();
    let line = group
        .lines()
        .find(|l| l.starts_with(&format!("{socket_group}:")))
        .unwrap_or_else(|| panic!("no group {socket_group} (SocketGroup=) in:\n{group}"));
    assert!(
        line.rsplit(':')
            .next()
            .unwrap_or("")
            .split(',')
            .any(|m| m == "iotcored"),
        "iotcored is not a member of {socket_group}: {line}"
    );
}

// ---------------------------------------------------------------------------
// (d) make install

fn make_install(destdir: &Path, vars: &[&str]) -> Output {
    let builddir = Path::new(BIN).parent().unwrap();
    assert_eq!(Path::new(CTL).parent(), Some(builddir));
    let out = run(
        Command::new("make")
            .arg("-C")
            .arg(ROOT)
            .arg("install")
            .arg("NOBUILD=1")
            .arg(format!("BUILDDIR={}", builddir.display()))
            .arg(format!("DESTDIR={}", destdir.display()))
            .args(vars)
            .env_remove("MAKEFLAGS")
            .env_remove("MFLAGS"),
        "make",
    );
    assert!(out.status.success(), "make install: {}", text(&out));
    out
}

#[test]
fn make_install_puts_everything_in_place_and_keeps_the_env_file() {
    let dest = TempDir::new("install");
    let d = dest.path();
    make_install(d, &["PREFIX=/usr"]);
    for (file, mode) in [
        ("usr/bin/iotcored", 0o755),
        ("usr/bin/iotcorectl", 0o755),
        ("usr/lib/systemd/system/iotcored.service", 0o644),
        ("usr/lib/systemd/system/iotcored.socket", 0o644),
        ("usr/lib/sysusers.d/iotcored.conf", 0o644),
        ("etc/iotcored/iotcored.env", 0o644),
    ] {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = fs::metadata(d.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, mode, "mode of {file}");
    }
    assert_eq!(
        fs::read(d.join("usr/bin/iotcored")).unwrap(),
        fs::read(BIN).unwrap()
    );
    let service = fs::read_to_string(d.join("usr/lib/systemd/system/iotcored.service")).unwrap();
    assert!(service.contains("\nExecStart=/usr/bin/iotcored "));
    assert!(service.contains("\nEnvironmentFile=/etc/iotcored/iotcored.env\n"));
    assert_eq!(
        fs::read_to_string(d.join("etc/iotcored/iotcored.env")).unwrap(),
        read("config/systemd/iotcored.env.example")
    );

    // A second install keeps the administrator's environment file.
    fs::write(
        d.join("etc/iotcored/iotcored.env"),
        "IOTCORED_ENDPOINT=mine\n",
    )
    .unwrap();
    let out = make_install(d, &["PREFIX=/usr"]);
    assert!(
        text(&out).contains("keeping the existing"),
        "{}",
        text(&out)
    );
    assert_eq!(
        fs::read_to_string(d.join("etc/iotcored/iotcored.env")).unwrap(),
        "IOTCORED_ENDPOINT=mine\n"
    );
}

#[test]
fn make_install_follows_prefix_bindir_and_systemdunitdir() {
    let dest = TempDir::new("install-prefix");
    let d = dest.path();
    make_install(
        d,
        &[
            "PREFIX=/opt/iot",
            "BINDIR=/opt/iot/sbin",
            "SYSTEMDUNITDIR=/etc/systemd/system",
        ],
    );
    assert!(d.join("opt/iot/sbin/iotcored").is_file());
    assert!(d.join("opt/iot/sbin/iotcorectl").is_file());
    assert!(d.join("opt/iot/lib/sysusers.d/iotcored.conf").is_file());
    assert!(d.join("opt/iot/etc/iotcored/iotcored.env").is_file());
    let service = fs::read_to_string(d.join("etc/systemd/system/iotcored.service")).unwrap();
    assert!(
        service.contains("\nExecStart=/opt/iot/sbin/iotcored "),
        "{service}"
    );
    assert!(
        service.contains("\nEnvironmentFile=/opt/iot/etc/iotcored/iotcored.env\n"),
        "{service}"
    );
    assert!(d.join("etc/systemd/system/iotcored.socket").is_file());
}
