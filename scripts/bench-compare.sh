#!/usr/bin/env bash
# Side by side, one run: the same 1,000,000 messages (~90-byte JSON with 4 metrics, QoS 0,
# one connection, `mosquitto_pub -l`) into Mosquitto, relayed to `mosquitto_sub`, and into
# a release fluxgate, stored in its embedded store. Prints both rates and their ratio.
#
# Rates are messages over the time from the publisher's start until the last message
# arrived: received by mosquitto_sub, or committed to fluxgate's store (its
# fluxgate_store_readings_written_total counter, 4 readings per message). Needs Debian's
# mosquitto and mosquitto-clients (bench only; the tests do not use them).
# Usage: scripts/bench-compare.sh [messages]
set -euo pipefail
cd "$(dirname "$0")/.."
messages=${1:-1000000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}

for tool in mosquitto mosquitto_pub mosquitto_sub curl python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install mosquitto mosquitto-clients curl python3)" >&2; exit 1; }
done
cargo build --release -p fluxgate

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }

# The feed: one JSON message per line, distinct timestamps, four metrics.
python3 - "$messages" >"$work/feed" <<'PY'
import sys
n = int(sys.argv[1])
t0 = 1_795_000_000_000
out = sys.stdout
for i in range(n):
    out.write('{"ts":%d,"values":{"temp":%.2f,"humidity":%.2f,"pressure":%.1f,"battery":%.3f}}\n'
              % (t0 + i, 20 + (i % 10) * 0.37, 45.5 + i % 7, 1013.2 - i % 5, 3.9 - (i % 3) * 0.01))
PY
echo "feed: $messages messages, $(( $(wc -c <"$work/feed") / messages )) bytes each (with newline)"

# --- Mosquitto: publisher -> broker -> subscriber ------------------------------------
mport=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n' "$mport" >"$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do mosquitto_sub -p "$mport" -t probe -W 1 -C 1 -E 2>/dev/null && break; sleep 0.1; done
mosquitto_sub -p "$mport" -t bench/feed -C "$messages" -W 120 >"$work/received" &
sub=$!
sleep 0.5
start=$(now)
mosquitto_pub -p "$mport" -t bench/feed -q 0 -l <"$work/feed"
wait "$sub" || true
end=$(now)
received=$(wc -l <"$work/received")
mosq_rate=$(python3 -c "print(round($received / ($end - $start)))")
echo "mosquitto: $received of $messages relayed to mosquitto_sub in $(python3 -c "print(round($end - $start, 2))") s: $mosq_rate msg/s"

# --- fluxgate: publisher -> gateway -> store ----------------------------------------
data="$work/data"
log="$work/fluxgate.log"
FLUXGATE_DATA_DIR="$data" FLUXGATE_HTTP__LISTEN=127.0.0.1:0 FLUXGATE_MQTT__LISTEN=127.0.0.1:0 \
  "$CARGO_TARGET_DIR/release/fluxgate" >"$log" 2>&1 &
gw=$!
pids+=("$gw")
for _ in $(seq 100); do grep -q 'listening mqtt=' "$log" && break; sleep 0.1; done
mqtt=$(grep -o 'mqtt=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
http=$(grep -o 'http=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
key=$(grep -o 'fgk_[A-Za-z0-9_-]*' "$log" | head -1)
token=$(curl -sf -X POST "http://$http/api/v1/devices" -H "Authorization: Bearer $key" \
  -H 'Content-Type: application/json' -d '{"id":"cmp-1"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
stored() { curl -s "http://$http/metrics" | awk '$1=="fluxgate_store_readings_written_total"{print $2}'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$gw/stat"; }
want=$((messages * 4))
cpu0=$(cpu_ticks)
start=$(now)
mosquitto_pub -h "${mqtt%:*}" -p "${mqtt##*:}" -i cmp-1 -u cmp-1 -P "$token" \
  -t devices/cmp-1/telemetry -q 0 -l <"$work/feed"
# Wait for the store to commit the last message (bounded: stop when nothing moved for 5 s).
last=-1; still=0
while :; do
  n=$(stored); n=${n:-0}
  [ "$n" -ge "$want" ] && break
  if [ "$n" = "$last" ]; then still=$((still + 1)); [ "$still" -ge 50 ] && break; else still=0; fi
  last=$n
  sleep 0.1
done
end=$(now)
cpu1=$(cpu_ticks)
rss=$(awk '/VmHWM/{print $2}' "/proc/$gw/status")
stored_msgs=$(( $(stored) / 4 ))
flux_rate=$(python3 -c "print(round($stored_msgs / ($end - $start)))")
us_per_msg=$(python3 -c "print(round(($cpu1 - $cpu0) / 100 / $stored_msgs * 1e6, 2))")
echo "fluxgate: $stored_msgs of $messages stored in $(python3 -c "print(round($end - $start, 2))") s: $flux_rate msg/s, $us_per_msg us gateway CPU per message, peak RSS $((rss / 1024)) MiB"
echo "ratio fluxgate/mosquitto: $(python3 -c "print(round($flux_rate / $mosq_rate, 2))")"
