#!/usr/bin/env bash
# make cross: iotcored built for the two Arm targets of gateways and run
# there under qemu-user, with Debian's packages only.
#
#   aarch64-unknown-linux-gnu       64-bit Arm (ARMv8)
#   armv7-unknown-linux-gnueabihf   32-bit Arm, hard float: 32-bit usize
#                                   and pointers, 4-byte alignment of u64
#
# For each: the stripped release binaries (paths and sizes printed),
# clippy -D warnings on every target of the crate, the unit tests under
# qemu; then the end-to-end tests CROSS_E2E (default below; "all" for every
# one that runs there) with the aarch64 test binaries and daemon under
# qemu, against the host's mosquitto. The kernel runs the Arm daemon the
# tests start through binfmt_misc (qemu-user-static), registered here when
# it is not.
#
# Toolchain: Debian's rustc-web (/usr/bin/rustc, /usr/bin/cargo, with the
# standard library for arm64 and armhf from libstd-rust-web-dev), called by
# full path: rustup's stay first in PATH for everything else. Installed
# when missing (as root, with apt-get --no-remove).
#
# Settings: CROSS_TARGETS (default both), CROSS_CLIPPY and CROSS_UNIT (the
# targets linted and unit-tested; default: CROSS_TARGETS), CROSS_E2E,
# CROSS_TARGET_DIR
# (default /tmp/icx: the tests' socket paths must stay under
# 107 bytes, which a deep checkout's target/<triple>/tmp exceeds).
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top"

targets=${CROSS_TARGETS:-aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf}
clippy_targets=${CROSS_CLIPPY-$targets}
unit_targets=${CROSS_UNIT-$targets}
# The end-to-end files that run under emulation in a few minutes. Left
# out: pkcs11 (SoftHSM2 is the host's, not the target's), demo, docs,
# packaging (they test the host's tools), and robustness, whose flood test
# needs the daemon to work through 1.5 million packets in 30 s, which the
# emulated debug build does not.
default_e2e="connect bus mqtt5 isolation spool"
e2e=${CROSS_E2E:-$default_e2e}
if [[ $e2e == all ]]; then
    e2e="bus cli connect disk isolation limits mqtt5 quarantine spool systemd"
fi
export CARGO_TARGET_DIR=${CROSS_TARGET_DIR:-/tmp/icx}

# --- Debian's toolchain, the cross linkers and qemu ---------------------------
packages=()
for arch in arm64 armhf; do
    dir=aarch64-unknown-linux-gnu
    [[ $arch == armhf ]] && dir=armv7-unknown-linux-gnueabihf
    [[ -d /usr/lib/rustlib/$dir/lib ]] || packages+=("libstd-rust-web-dev:$arch")
done
[[ -x /usr/bin/rustc ]] || packages+=(rustc-web)
[[ -x /usr/bin/cargo ]] || packages+=(cargo-web)
[[ -x /usr/bin/cargo-clippy ]] || packages+=(rust-web-clippy)
command -v aarch64-linux-gnu-gcc >/dev/null || packages+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v arm-linux-gnueabihf-gcc >/dev/null || packages+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
command -v qemu-aarch64 >/dev/null || packages+=(qemu-user)
[[ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P || -x /usr/bin/qemu-aarch64-static ]] \
    || packages+=(qemu-user-static)
command -v update-binfmts >/dev/null || packages+=(binfmt-support)
if ((${#packages[@]})); then
    echo "cross: installing ${packages[*]}"
    for arch in arm64 armhf; do
        dpkg --print-foreign-architectures | grep -qx "$arch" || dpkg --add-architecture "$arch"
    done
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-remove --no-upgrade \
        "${packages[@]}" >/dev/null
fi

# binfmt_misc: the end-to-end tests exec the Arm daemon directly. Where it
# cannot be had (an unprivileged container), they are skipped, saying so;
# the unit tests run through cargo's runner and need no binfmt.
binfmt=yes
if [[ ! -e /proc/sys/fs/binfmt_misc/register ]]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || binfmt=no
fi
for q in qemu-aarch64 qemu-arm; do
    [[ -e /proc/sys/fs/binfmt_misc/$q ]] || update-binfmts --enable "$q" >/dev/null 2>&1 || binfmt=no
done

# --- the toolchain's environment --------------------------------------------------
# Debian's cargo finds Debian's cargo-clippy and clippy-driver first.
export PATH=/usr/bin:$PATH RUSTC=/usr/bin/rustc
cargo=/usr/bin/cargo
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc
export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc
export AR_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-ar
# No `-L /usr/<triple>`: the cross packages' loader would meet the
# multiarch C library, and the first thread start hangs (aarch64) or
# crashes (armv7).
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_RUNNER=qemu-arm
echo "cross: $($cargo --version), $(/usr/bin/rustc --version)"

for t in $targets; do
    echo "cross: $t: release build"
    $cargo build -q --release --target "$t" --bins
    for bin in iotcored iotcorectl; do
        f=$CARGO_TARGET_DIR/$t/release/$bin
        printf 'cross: %s: %s, %d bytes\n' "$t" "$f" "$(stat -c %s "$f")"
    done
    "$CARGO_TARGET_DIR/$t/release/iotcored" --version >/dev/null \
        || { echo "cross: $t: the binary does not run under qemu" >&2; exit 1; }
    if [[ " $clippy_targets " == *" $t "* ]]; then
        echo "cross: $t: clippy"
        $cargo clippy -q --all-targets --target "$t" -- -D warnings
    fi
    if [[ " $unit_targets " == *" $t "* ]]; then
        echo "cross: $t: unit tests under qemu"
        $cargo test -q --release --lib --target "$t"
    fi
done

if [[ -n $e2e && $targets == *aarch64* && $binfmt == no ]]; then
    echo "cross: binfmt_misc cannot be set up here: end-to-end tests under qemu SKIPPED" >&2
elif [[ -n $e2e && $targets == *aarch64* ]]; then
    args=()
    for f in $e2e; do args+=(--test "$f"); done
    echo "cross: aarch64-unknown-linux-gnu: end-to-end tests under qemu: $e2e"
    $cargo test --target aarch64-unknown-linux-gnu "${args[@]}"
fi
echo "cross: done"
