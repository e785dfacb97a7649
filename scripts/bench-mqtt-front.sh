#!/usr/bin/env bash
# The MQTT front's two figures for one gateway binary, each on a fresh gateway with a
# fresh data directory on loopback ports: RSS per idle MQTT connection at 1k/5k/10k
# (scripts/mqtt-idle.py), and one connection's QoS 0 rate (firmware-sim bench, 1 device,
# 1,000,000 JSON messages of 4 metrics) with the gateway's CPU time per message (from
# /proc/PID/stat, user + system, over the whole bench run). Run it for two builds to
# compare them (BENCHMARKS.md, "MQTT front").
# Usage: scripts/bench-mqtt-front.sh GATEWAY_BIN FIRMWARE_SIM_BIN [messages] [steps]
set -euo pipefail
gw_bin=$1
sim_bin=$2
messages=${3:-1000000}
steps=${4:-1000,5000,10000}
here=$(cd "$(dirname "$0")" && pwd)

start() {
  data=$(mktemp -d)
  log="$data/log"
  FLUXGATE_DATA_DIR="$data" FLUXGATE_HTTP__LISTEN=127.0.0.1:0 FLUXGATE_MQTT__LISTEN=127.0.0.1:0 \
    FLUXGATE_MQTT__MAX_CONNECTIONS=20000 NO_COLOR=1 "$gw_bin" >"$log" 2>&1 &
  gw=$!
  for _ in $(seq 200); do grep -q 'listening mqtt=' "$log" 2>/dev/null && break; sleep 0.1; done
  mqtt=$(grep -o 'mqtt=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
  http=$(grep -o 'http=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
  key=$(grep -o 'fgk_[A-Za-z0-9_-]*' "$log" | head -1)
}
stop() {
  kill "$gw" 2>/dev/null || true
  wait "$gw" 2>/dev/null || true
  rm -rf "$data"
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
trap stop EXIT

echo "== $gw_bin: idle connections"
start
python3 "$here/mqtt-idle.py" --mqtt "$mqtt" --http "$http" --key "$key" --pid "$gw" --steps "$steps"
stop

echo "== $gw_bin: one connection, QoS 0, $messages messages"
start
export FLUXGATE_API_KEY=$key
before=$(cpu_ticks "$gw")
"$sim_bin" bench --transport mqtt --encoding json --qos 0 --devices 1 --messages "$messages" \
  --mqtt "$mqtt" --http "$http" --tokens-file "$data/sim-tokens.json"
after=$(cpu_ticks "$gw")
hz=$(getconf CLK_TCK)
echo "gateway CPU: $(( (after - before) * 1000 / hz )) ms for $messages messages" \
  "($(awk "BEGIN {printf \"%.2f\", ($after - $before) / $hz * 1e6 / $messages}") us/message)"
peak=$(grep VmHWM "/proc/$gw/status" | awk '{print $2}')
echo "gateway peak RSS: $((peak / 1024)) MiB"
stored=$(curl -s "http://$http/metrics" | grep '^fluxgate_store_readings_written_total' | cut -d' ' -f2)
echo "store readings written: $stored"
stop
trap - EXIT
