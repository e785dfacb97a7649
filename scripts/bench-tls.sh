#!/usr/bin/env bash
# Ingest with TLS on against plaintext, the same gateway, alternating (BENCHMARKS.md,
# "TLS"): one release gateway with both MQTT listeners and both HTTP listeners (fresh
# data directory, loopback ports, `fluxgate certs dev` certificates), then for each
# round firmware-sim bench over MQTT QoS 0, MQTT QoS 1 and WebSocket, plaintext then TLS
# (`--tls --ca`). Then the RSS per idle MQTT connection, plaintext and mqtts, each on a
# fresh gateway (scripts/mqtt-idle.py, with --cafile for mqtts).
# Usage: scripts/bench-tls.sh GATEWAY_BIN FIRMWARE_SIM_BIN [mqtt messages] [rounds] [idle steps]
# (PARTS=idle runs only the idle measurement, PARTS=bench only the rates.)
set -euo pipefail
gw_bin=$1
sim_bin=$2
messages=${3:-500000}
rounds=${4:-3}
steps=${5:-1000,5000}
here=$(cd "$(dirname "$0")" && pwd)

start() {
  data=$(mktemp -d)
  log="$data/log"
  "$gw_bin" certs dev --out "$data/certs" >/dev/null
  FLUXGATE_DATA_DIR="$data" FLUXGATE_HTTP__LISTEN=127.0.0.1:0 FLUXGATE_MQTT__LISTEN=127.0.0.1:0 \
    FLUXGATE_MQTT__MAX_CONNECTIONS=20000 NO_COLOR=1 \
    FLUXGATE_MQTT__TLS__ENABLED=true FLUXGATE_MQTT__TLS__LISTEN=127.0.0.1:0 \
    FLUXGATE_MQTT__TLS__CERT="$data/certs/server.pem" FLUXGATE_MQTT__TLS__KEY="$data/certs/server-key.pem" \
    FLUXGATE_HTTP__TLS__ENABLED=true FLUXGATE_HTTP__TLS__LISTEN=127.0.0.1:0 \
    FLUXGATE_HTTP__TLS__CERT="$data/certs/server.pem" FLUXGATE_HTTP__TLS__KEY="$data/certs/server-key.pem" \
    env -u FLUXGATE_API_KEY "$gw_bin" >"$log" 2>&1 &
  gw=$!
  for _ in $(seq 200); do grep -q 'listening mqtt=' "$log" 2>/dev/null && break; sleep 0.1; done
  mqtt=$(grep -o ' mqtt=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
  mqtts=$(grep -o 'mqtts=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
  http=$(grep -o ' http=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
  https=$(grep -o 'https=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
  key=$(grep -o 'fgk_[A-Za-z0-9_-]*' "$log" | head -1)
  ca="$data/certs/ca.pem"
}
stop() {
  kill "$gw" 2>/dev/null || true
  wait "$gw" 2>/dev/null || true
  rm -rf "$data"
}
trap stop EXIT

bench() { # label, then firmware-sim bench arguments
  local label=$1
  shift
  echo "== $label"
  "$sim_bin" bench --json --http "$http" --tokens-file "$data/sim-tokens.json" \
    --gateway-pid "$gw" "$@" | tail -1
}

parts=${PARTS:-bench,idle}
if [[ $parts == *bench* ]]; then
start
export FLUXGATE_API_KEY=$key
echo "load before: $(uptime)"
for round in $(seq "$rounds"); do
  echo "# round $round"
  bench "mqtt qos0 plain" --transport mqtt --qos 0 --devices 10 --messages "$messages" --mqtt "$mqtt"
  bench "mqtt qos0 tls" --transport mqtt --qos 0 --devices 10 --messages "$messages" --mqtt "$mqtts" --tls --ca "$ca"
  bench "mqtt qos1 plain" --transport mqtt --qos 1 --devices 10 --messages "$messages" --mqtt "$mqtt"
  bench "mqtt qos1 tls" --transport mqtt --qos 1 --devices 10 --messages "$messages" --mqtt "$mqtts" --tls --ca "$ca"
  bench "ws plain" --transport ws --devices 10 --messages $((messages / 5))
  bench "ws tls" --transport ws --devices 10 --messages $((messages / 5)) --tls --ca "$ca" --https "$https"
done
echo "load after: $(uptime)"
stop
fi

[[ $parts == *idle* ]] || exit 0
echo "== idle connections, plaintext"
start
python3 "$here/mqtt-idle.py" --mqtt "$mqtt" --http "$http" --key "$key" --pid "$gw" --steps "$steps"
stop
echo "== idle connections, mqtts"
start
python3 "$here/mqtt-idle.py" --mqtt "$mqtts" --http "$http" --key "$key" --pid "$gw" --steps "$steps" --cafile "$ca"
stop
trap - EXIT
