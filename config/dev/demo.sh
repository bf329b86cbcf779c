#!/usr/bin/env bash
# The demo: a throw-away PKI, a local mosquitto on 127.0.0.1 with TLS and
# client certificates required, and iotcored in the foreground against it.
#
# Usage: demo.sh [DIR [IOTCORED OPTIONS...]]      (or: make demo [DEMO_PORT=N])
#
#   DIR                 the demo's directory [default: demo/ at the top of the
#                       tree]: pki/, mosquitto.conf, mosquitto.log, run/ (the
#                       bus socket), demo.lock
#   IOTCORED OPTIONS    appended to iotcored's command line (e.g. --keepalive 30)
#
# Environment:
#   DEMO_PORT           mosquitto's TLS port on 127.0.0.1 [8883]
#   IOTCORED_BIN_DIR    where iotcored and iotcorectl are
#                       [$CARGO_TARGET_DIR/release, else target/release]
#   RUST_LOG            iotcored's log filter [info]
#
# Exit status: 0 when stopped by Ctrl-C (SIGINT), SIGTERM or SIGHUP (128+N
# for a signal N that comes before iotcored runs); 1 when the demo cannot
# start (one already runs in DIR, the port is taken, mosquitto fails, a
# binary is missing); 2 for a bad DEMO_PORT; otherwise iotcored's own status
# when it ends by itself (3: credentials rejected).
#
# What it does, and why (issue 14):
# - One demo per DIR: DIR/demo.lock is held with flock(1) for the demo's
#   whole life and says "PID PORT". A second demo on the same DIR takes
#   nothing before that lock, so it leaves the running one's certificates,
#   config, log and socket alone, and exits 1 naming its pid and port.
# - The PKI (config/dev/gen-pki.sh into DIR/pki) is made once and kept
#   across runs; `rm -rf DIR/pki` for a new one.
# - A port that something already listens on is reported before anything
#   starts (with its owner when ss(8) can tell), not as mosquitto's
#   "Address already in use" in its log.
# - Ctrl-C: iotcored stops (DISCONNECT, exit 0), then this script stops
#   mosquitto by its pid and exits 0. mosquitto runs in a session of its own
#   (setsid), so the terminal's SIGINT never reaches it and it is never
#   gone (reaped) before the script stops it; the stop tolerates that anyway,
#   as every command of the cleanup may fail without ending it (set -e).
#   SIGTERM and SIGHUP to this script (its pid is printed and in demo.lock)
#   do the same as Ctrl-C; a second one kills iotcored (SIGKILL).
# - `make demo`: a terminal sends Ctrl-C to its whole foreground process
#   group, make included, and make then dies of SIGINT whatever its recipe
#   returns (the shell sees 130). So, when this script runs in the
#   terminal's foreground process group, it first moves into a process
#   group of its own and makes that the terminal's foreground group (perl's
#   POSIX tcsetpgrp; the same pid, by exec): Ctrl-C then reaches this
#   script and iotcored only, make gets the demo's status, and the terminal
#   is handed back on exit. Ctrl-Z is ignored meanwhile (a stopped demo
#   would hold the terminal with make waiting for it). Without a terminal
#   (a test, CI) nothing changes: SIGINT to the script's process group is
#   what a terminal's Ctrl-C is.
# - mosquitto started as root switches to its `user` (default "mosquitto")
#   before it reads the certificates, and warns "Mosquitto should not be run
#   as root" when that is root. So, as root, it runs as "mosquitto" (or
#   "nobody" if there is no such user) when that user can read the PKI;
#   only when it cannot (DIR under a private home) does it stay root, and
#   says so. It logs to its stderr, which this script opens (DIR is ours),
#   into DIR/mosquitto.log, emptied at each start. Not root: it runs as the
#   invoking user, which it never leaves.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)

usage() {
    sed -n '2,/^set -euo/p' "$here/demo.sh" | sed '$d; s/^# \{0,1\}//'
}
case "${1:-}" in
    -h | --help)
        usage
        exit 0
        ;;
esac

# Take the terminal (see "make demo" above); perl re-executes this script,
# with the same pid, in its own foreground process group, or leaves all as
# it is when there is no terminal or we are not in its foreground group.
if [[ -z "${IOTCORED_DEMO_TTY:-}" ]] && command -v perl >/dev/null 2>&1; then
    export IOTCORED_DEMO_TTY=checked
    exec perl -MPOSIX -e '
        my ($tty, $was);
        if (open($tty, "+<", "/dev/tty")) {
            my $fg = POSIX::tcgetpgrp(fileno($tty));
            $was = getpgrp();
            if (defined $fg && $fg == $was && $was != $$ && POSIX::setpgid(0, 0)) {
                local $SIG{TTOU} = "IGNORE";
                if (POSIX::tcsetpgrp(fileno($tty), $$)) {
                    $ENV{IOTCORED_DEMO_TTY} = $was;
                } else {
                    POSIX::setpgid(0, $was);
                }
            }
        }
        exec { $ARGV[0] } @ARGV or die "demo: cannot run bash: $!\n";
    ' bash "$here/demo.sh" "$@"
fi
tty_pgrp=${IOTCORED_DEMO_TTY:-}
[[ "$tty_pgrp" =~ ^[0-9]+$ ]] || tty_pgrp=
unset IOTCORED_DEMO_TTY
[[ -z "$tty_pgrp" ]] || trap '' TSTP

dir=${1:-$top/demo}
[[ $# -gt 0 ]] && shift
port=${DEMO_PORT:-8883}
bin=${IOTCORED_BIN_DIR:-${CARGO_TARGET_DIR:-$top/target}/release}

say() { echo "demo: $*"; }
die() {
    echo "demo: $*" >&2
    exit 1
}

if ! [[ "$port" =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
    echo "demo: DEMO_PORT must be a TCP port, 1-65535, not '$port'" >&2
    exit 2
fi
port=$((10#$port))
for exe in iotcored iotcorectl; do
    [[ -x "$bin/$exe" ]] || die "no $bin/$exe: run 'make release', or set IOTCORED_BIN_DIR"
done
bin=$(cd "$bin" && pwd)
for cmd in mosquitto flock setsid openssl; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found (make deps installs mosquitto and openssl; flock and setsid are util-linux)"
done

# State for the cleanup; every step of it may fail without stopping it.
broker=""  # mosquitto's pid
daemon=""  # iotcored's pid
locked=""  # we hold DIR/demo.lock
signals=0  # INT, TERM, HUP or QUIT received
stop_signal=""

# Stops a child by its pid: SIGTERM, SIGKILL after 5 s; waits until it is
# gone (at most 2 s more).
# (SC2317: these three run from the traps, which shellcheck does not follow.)
# shellcheck disable=SC2317
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1 || true
    done
    kill -KILL "$pid" 2>/dev/null || true
    # Reaped by bash's SIGCHLD handler; no `wait` (see the end).
    for ((i = 0; i < 20; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1 || true
    done
}

# shellcheck disable=SC2317
cleanup() {
    set +e
    if [[ -n "$daemon" ]]; then
        stop_pid "$daemon"
        daemon=""
    fi
    if [[ -n "$broker" ]]; then
        stop_pid "$broker"
        say "mosquitto (pid $broker) stopped"
        broker=""
    fi
    # Children started as a signal came, before their pid was noted.
    local pid
    for pid in $(jobs -p); do stop_pid "$pid"; done
    # Still holding the lock: what it says is ours to clear.
    [[ -z "$locked" ]] || : >"$dir/demo.lock"
    if [[ -n "$tty_pgrp" ]]; then
        perl -MPOSIX -e 'open(my $t, "+<", "/dev/tty") or exit;
            $SIG{TTOU} = "IGNORE"; POSIX::tcsetpgrp(fileno($t), $ARGV[0]);' "$tty_pgrp"
    fi
}
trap cleanup EXIT

# Ctrl-C (SIGINT), SIGTERM, SIGHUP: stop iotcored, whose end ends the wait
# below; before it runs, stop here (the EXIT trap stops mosquitto).
# shellcheck disable=SC2317
on_signal() {
    signals=$((signals + 1))
    stop_signal=${stop_signal:-$1}
    if [[ -n "$daemon" ]]; then
        if ((signals > 1)); then
            kill -KILL "$daemon" 2>/dev/null || true
        else
            kill -TERM "$daemon" 2>/dev/null || true
        fi
    else
        echo "demo: $1 before iotcored started; stopping" >&2
        case $1 in
            HUP) exit 129 ;;
            INT) exit 130 ;;
            QUIT) exit 131 ;;
            *) exit 143 ;;
        esac
    fi
}
for sig in INT TERM HUP QUIT; do
    # shellcheck disable=SC2064 # $sig now, on purpose
    trap "on_signal $sig" "$sig"
done

# One demo per DIR. The lock is taken before anything in DIR is touched,
# and opened without truncating what a running demo wrote into it.
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
exec {lock_fd}<>"$dir/demo.lock"
if ! flock -n "$lock_fd"; then
    read -r other_pid other_port <"$dir/demo.lock" || true
    die "a demo already runs in $dir (pid ${other_pid:-unknown}, mosquitto on 127.0.0.1:${other_port:-unknown});" \
        "stop it first (Ctrl-C in its terminal, or kill ${other_pid:-its pid}), or give this one another directory (DEMO_DIR=...) and DEMO_PORT"
fi
locked=1
echo "$$ $port" >"$dir/demo.lock"

# Something else on the port: say so, with its owner when ss can tell.
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    owner=$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'users:.*' | head -n 1 || true)
    die "port $port on 127.0.0.1 is already in use${owner:+ ($owner)}; choose another with DEMO_PORT=N (make demo DEMO_PORT=N)"
fi

mkdir -p "$dir/run"
bash "$here/gen-pki.sh" "$dir/pki" >/dev/null {lock_fd}<&-

# Who mosquitto runs as (see above).
user_line="# not root: mosquitto runs as $(id -un), which it never leaves"
as_user=$(id -un)
if [[ "$(id -u)" -eq 0 ]]; then
    as_user=mosquitto
    id -u "$as_user" >/dev/null 2>&1 || as_user=nobody
    readable=1
    command -v setpriv >/dev/null 2>&1 || readable=""
    for f in ca.pem server.pem server.key; do
        setpriv --reuid="$as_user" --regid="$(id -g "$as_user")" --init-groups \
            test -r "$dir/pki/$f" 2>/dev/null || readable=""
    done
    if [[ -n "$readable" ]]; then
        user_line="user $as_user"
    else
        user_line="user root"
        echo "demo: user $as_user cannot read $dir/pki, so mosquitto runs as root (and warns about it); a DIR outside a private home avoids that" >&2
        as_user=root
    fi
fi

cat >"$dir/mosquitto.conf" <<CONF
# Generated by config/dev/demo.sh
$user_line
persistence false
log_dest stderr
log_type all
connection_messages true
listener $port 127.0.0.1
cafile $dir/pki/ca.pem
certfile $dir/pki/server.pem
keyfile $dir/pki/server.key
require_certificate true
use_identity_as_username true
allow_anonymous false
CONF

log="$dir/mosquitto.log"
: >"$log"
setsid mosquitto -c "$dir/mosquitto.conf" </dev/null >>"$log" 2>&1 {lock_fd}<&- &
broker=$!
# Ready once it logs "running" (after binding the port and loading the
# certificates); bounded.
for ((i = 0; i < 100; i++)); do
    if ! kill -0 "$broker" 2>/dev/null; then
        broker=""
        if grep -q "Address already in use" "$log"; then
            die "port $port on 127.0.0.1 is already in use; choose another with DEMO_PORT=N (make demo DEMO_PORT=N)"
        fi
        die "mosquitto failed to start; $log says:"$'\n'"$(tail -n 5 "$log")"
    fi
    grep -q ' running$' "$log" && break
    sleep 0.1 || true
done
grep -q ' running$' "$log" || die "mosquitto did not start within 10 s; see $log"

q() { printf '%q' "$1"; }
ctl="$(q "$bin/iotcorectl") --socket-dir $(q "$dir/run")"
pki=$(q "$dir/pki")
say "mosquitto (pid $broker, as $as_user) on 127.0.0.1:$port, log: $log"
say "iotcored's bus socket: $dir/run/aws_iot_mqtt"
say "Ctrl-C stops both (or: kill $$)."
echo "In another terminal:"
echo "  $ctl status"
echo "  $ctl stats"
echo "  $ctl sub -t 'demo/#' -v"
echo "  $ctl pub -t demo/hello -m hi"
echo "At the broker's side (AWS IoT Core's, here), with the demo's client certificate:"
echo "  mosquitto_sub -h 127.0.0.1 -p $port --cafile $pki/ca.pem --cert $pki/client.pem --key $pki/client.key -t 'demo/#' -v"

RUST_LOG=${RUST_LOG:-info} "$bin/iotcored" \
    -e 127.0.0.1 -i iotcored-demo \
    -r "$dir/pki/ca.pem" -c "$dir/pki/client.pem" -k "$dir/pki/client.key" \
    --port "$port" --socket-dir "$dir/run" "$@" </dev/null {lock_fd}<&- &
daemon=$!

# Wait for iotcored to end, by polling. Not with `wait` while it runs: a
# trapped signal (Ctrl-C) that interrupts the `wait` builtin just as bash
# reaps the child loses its status, and a later `wait` for it then blocks
# for ever (bash 5.2 here: several hangs in 100 Ctrl-Cs). Once it is
# gone, bash has reaped it (SIGCHLD) and kept its status for `wait`.
# (`|| true`: a sleep that a Ctrl-C ends must not end the script by set -e
# before the trap has run.)
while kill -0 "$daemon" 2>/dev/null; do
    sleep 0.2 || true
done
if wait "$daemon"; then status=0; else status=$?; fi
daemon=""
if [[ -n "$stop_signal" ]]; then
    say "$stop_signal: iotcored stopped (status $status)"
else
    echo "demo: iotcored exited by itself with status $status" >&2
fi
exit "$status"
