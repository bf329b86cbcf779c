#!/usr/bin/env bash
# Heap allocations per publish, counted by valgrind: the daemon (rate limit
# off, with symbols) runs against a local mosquitto on 127.0.0.1 while
# iotcorectl publishes N and then 3N messages; the difference of the two
# totals, divided by 2N, is what one message costs, and valgrind's xtree
# says where those allocations come from. Part of `make bench`.
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

# Runs the daemon under valgrind, publishes $1 messages, prints the total.
run() {
  local count=$1 sock=$work/sock$1 daemon
  rm -rf "$sock"
  valgrind --tool=memcheck --xtree-memory=full --xtree-memory-file="$work/xt$count.kcg" \
    --log-file="$work/valgrind$count.log" \
    "$bin" -e 127.0.0.1 -i "alloc-check-$count" -r "$work/pki/ca.pem" \
    -c "$work/pki/client.pem" -k "$work/pki/client.key" --port "$port" \
    --socket-dir "$sock" 2>/dev/null &
  daemon=$!
  for _ in $(seq 100); do [ -S "$sock/aws_iot_mqtt" ] && break; sleep 0.1; done
  sleep 2 # connected
  seq 1 "$count" | sed 's/^/message-/' | "$ctl" --socket-dir "$sock" --timeout 30 pub -t alloc/t -l >/dev/null
  sleep 1
  kill -TERM "$daemon"; wait "$daemon" || true
  sed -n 's/.*total heap usage: \([0-9,]*\) allocs.*/\1/p' "$work/valgrind$count.log" | tr -d ,
}
low=$(run "$n")
high=$(run $((3 * n)))
per=$(python3 -c "print(f'{($high - $low) / (2 * $n):.2f}')")
echo "heap allocations: $low for $n publishes, $high for $((3 * n)): $per per publish"
# Allocations made under rustls's record encryption (one buffer per TLS
# record it writes), from the xtree of the larger run.
rustls=$(callgrind_annotate --sort=totBk --inclusive=yes --threshold=100 "$work/xt$((3 * n)).kcg" 2>/dev/null \
  | grep -m1 'RecordLayer::encrypt_outgoing' \
  | python3 -c 'import re,sys; n=re.findall(r"([0-9,]+) \(", sys.stdin.read()); print(n[1].replace(",","") if len(n) > 1 else 0)' || true)
rustls=${rustls:-0}
python3 - "$low" "$high" "$n" "$rustls" <<'PY'
import sys
low, high, n, rustls = (int(x) for x in sys.argv[1:])
per = (high - low) / (2 * n)
in_rustls = rustls / (3 * n)
print(f"  of which rustls's record encryption: {in_rustls:.2f} per publish; "
      f"the rest (iotcored's own code, the bus, the spool): {max(per - in_rustls, 0):.2f}")
PY
