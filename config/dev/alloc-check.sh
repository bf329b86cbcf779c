#!/usr/bin/env bash
# Heap allocations per publish, counted by valgrind: the daemon (rate limit
# off, with symbols) runs against a local mosquitto on 127.0.0.1 while
# iotcorectl publishes N and then 3N messages; the difference of the two
# totals, divided by the difference of the messages published (a QoS 1 run
# under valgrind may see some answered BUSY), is what one message costs,
# and valgrind's xtree says where those allocations come from. QoS 0 and
# QoS 1 (ALLOC_QOS=0 or 1 for one of them). Part of `make bench`.
#
# What to expect: none from iotcored's own code. rustls 0.23 allocates one
# buffer per TLS record it encrypts and one copy of each application-data
# record's plaintext it receives (its unbuffered API too). iotcored seals
# what it sends between two flushes into one record, so with pipelined
# publishes QoS 0 costs a few hundredths (a lone message still costs one);
# QoS 1 adds about one for the PUBACK, which mosquitto sends in a record
# of its own.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
n=${ALLOC_MESSAGES:-1000}
work=$top/target/bench/alloc
bin=$top/target/bench-alloc/release/iotcored
ctl=$top/target/release/iotcorectl
command -v valgrind >/dev/null || { echo "alloc-check: valgrind not installed; skipped"; exit 0; }
mkdir -p "$work"
IOTCORED_PUBLISH_RATE=0 IOTCORED_PUBLISH_BYTES_PER_SEC=0 \
  CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=1 \
  CARGO_TARGET_DIR=$top/target/bench-alloc cargo build -q --release --bin iotcored
cargo build -q --release --bin iotcorectl
bash "$here/gen-pki.sh" "$work/pki" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/mosquitto.conf" <<CONF
user root
persistence false
log_dest none
listener $port 127.0.0.1
cafile $work/pki/ca.pem
certfile $work/pki/server.pem
keyfile $work/pki/server.key
require_certificate true
use_identity_as_username true
CONF
mosquitto -c "$work/mosquitto.conf" 2>/dev/null &
broker=$!
trap 'kill "$broker" 2>/dev/null; wait "$broker" 2>/dev/null || true' EXIT
sleep 0.5

# Runs the daemon under valgrind, publishes $1 messages of QoS $2, prints
# the total of allocations and how many messages were published.
run() {
  local count=$1 qos=$2 sock=$work/sock$1 daemon
  rm -rf "$sock"
  valgrind --tool=memcheck --xtree-memory=full --xtree-memory-file="$work/xt$count-q$qos.kcg" \
    --log-file="$work/valgrind$count-q$qos.log" \
    "$bin" -e 127.0.0.1 -i "alloc-check-$count" -r "$work/pki/ca.pem" \
    -c "$work/pki/client.pem" -k "$work/pki/client.key" --port "$port" \
    --socket-dir "$sock" 2>/dev/null &
  daemon=$!
  for _ in $(seq 100); do [ -S "$sock/aws_iot_mqtt" ] && break; sleep 0.1; done
  sleep 2 # connected
  seq 1 "$count" | sed 's/^/message-/' \
    | "$ctl" --socket-dir "$sock" --timeout 30 pub -t alloc/t -q "$qos" -l >/dev/null 2>"$work/ctl$count-q$qos.err" || true
  sleep 1
  kill -TERM "$daemon"; wait "$daemon" || true
  local allocs published
  allocs=$(sed -n 's/.*total heap usage: \([0-9,]*\) allocs.*/\1/p' "$work/valgrind$count-q$qos.log" | tr -d ,)
  # iotcorectl says "K of N message(s) published" when some failed.
  published=$(sed -n 's/.* \([0-9]*\) of [0-9]* message(s) published.*/\1/p' "$work/ctl$count-q$qos.err")
  echo "$allocs ${published:-$count}"
}
# How many allocations the xtree puts under function $2 of file $1.
under() {
  callgrind_annotate --sort=totBk --inclusive=yes --threshold=100 "$1" 2>/dev/null \
    | grep -m1 "$2" \
    | python3 -c 'import re,sys; n=re.findall(r"([0-9,]+) \(", sys.stdin.read()); print(n[1].replace(",","") if len(n) > 1 else 0)' || true
}
for qos in ${ALLOC_QOS:-0 1}; do
  read -r low low_n < <(run "$n" "$qos")
  read -r high high_n < <(run $((3 * n)) "$qos")
  xt=$work/xt$((3 * n))-q$qos.kcg
  # rustls: one buffer per TLS record it encrypts (RecordLayer::encrypt_outgoing),
  # and a copy of each record's plaintext it receives (Payload::into_vec:
  # a PUBACK, for QoS 1). Per message of the larger run.
  sent=$(under "$xt" 'RecordLayer::encrypt_outgoing'); sent=${sent:-0}
  received=$(under "$xt" 'Payload::into_vec'); received=${received:-0}
  python3 - "$qos" "$low" "$high" "$low_n" "$high_n" "$sent" "$received" <<'PY'
import sys
qos = sys.argv[1]
low, high, low_n, high_n, sent, received = (int(x) for x in sys.argv[2:])
per = (high - low) / (high_n - low_n)
s, r = sent / high_n, received / high_n
print(f"heap allocations, QoS {qos}: {low} for {low_n} publishes, {high} for {high_n}: {per:.2f} per publish")
print(f"  of which rustls's record encryption {s:.2f}, its received plaintext {r:.2f}; "
      f"the rest (iotcored's own code, the bus, the spool): {max(per - s - r, 0):.2f}")
PY
done
