#!/usr/bin/env bash
# The fleet figures of one gateway binary at the connection count one process can hold
# here (open files are capped at 20,000 per process): on one fresh gateway (fresh data
# directory, loopback ports), a reconnect storm (every device connects at once: time until
# all are online, connect errors by kind), then the steady fleet on the same connections'
# devices (1 message/s of 4 metrics each: stored rate, lag, gateway CPU and RSS); then, on
# a second fresh gateway, RSS per idle MQTT connection at the given steps
# (scripts/mqtt-idle.py). The load average is printed next to every part, since other
# work on the machine moves these figures.
# Usage: scripts/bench-fleet.sh GATEWAY_BIN FIRMWARE_SIM_BIN [devices] [duration] [idle steps]
set -euo pipefail
gw_bin=$1
sim_bin=$2
devices=${3:-19000}
duration=${4:-60s}
steps=${5:-10000,19000}
here=$(cd "$(dirname "$0")" && pwd)
ulimit -n 20000

start() {
  data=$(mktemp -d)
  log="$data/log"
  FLUXGATE_DATA_DIR="$data" FLUXGATE_HTTP__LISTEN=127.0.0.1:0 FLUXGATE_MQTT__LISTEN=127.0.0.1:0 \
    FLUXGATE_MQTT__MAX_CONNECTIONS=19500 NO_COLOR=1 "$gw_bin" >"$log" 2>&1 &
  gw=$!
  for _ in $(seq 600); do grep -q 'listening mqtt=' "$log" 2>/dev/null && break; sleep 0.1; done
  grep -q 'listening mqtt=' "$log" || { echo "the gateway did not start:" >&2; cat "$log" >&2; exit 1; }
  mqtt=$(grep -o 'mqtt=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
  http=$(grep -o 'http=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
  key=$(grep -o 'fgk_[A-Za-z0-9_-]*' "$log" | head -1)
  export FLUXGATE_API_KEY=$key
}
stop() {
  kill "$gw" 2>/dev/null || true
  wait "$gw" 2>/dev/null || true
  echo "gateway log: $(grep -c ERROR "$log" || true) ERROR lines, $(grep -c WARN "$log" || true) WARN lines"
  rm -rf "$data"
}
trap stop EXIT

start
echo "== storm: $devices devices; load: $(uptime)"
"$sim_bin" bench --shape storm --devices "$devices" --mqtt "$mqtt" --http "$http" \
  --tokens-file "$data/tokens.json" --gateway-pid "$gw"
echo "== fleet: $devices devices x 1 msg/s x 4 metrics, $duration; load: $(uptime)"
"$sim_bin" bench --shape fleet --devices "$devices" --rate 1 --duration "$duration" \
  --mqtt "$mqtt" --http "$http" --tokens-file "$data/tokens.json" --gateway-pid "$gw"
echo "== after: load: $(uptime)"
stop

start
echo "== idle connections: steps $steps; load: $(uptime)"
python3 "$here/mqtt-idle.py" --mqtt "$mqtt" --http "$http" --key "$key" --pid "$gw" --steps "$steps"
echo "== after: load: $(uptime)"
stop
trap - EXIT
