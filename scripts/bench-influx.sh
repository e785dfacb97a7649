#!/usr/bin/env bash
# End-to-end benchmark of the InfluxDB sink: firmware-sim (MQTT, QoS 0, JSON, 4 metrics) -> release gateway with the
# InfluxDB sink (disk buffer) -> local VictoriaMetrics.
# Needs: victoria-metrics (apt), bc, curl, python3, and `cargo build --release -p fluxgate -p firmware-sim`.
# STORE=false measures the sink without the embedded store.
set -euo pipefail
cd "$(dirname "$0")/.."
vmdir=$(mktemp -d); data=$(mktemp -d); log=$(mktemp)
port=${VM_PORT:-18499}
victoria-metrics -httpListenAddr=127.0.0.1:$port -storageDataPath=$vmdir -retentionPeriod=100y -loggerLevel=ERROR >/dev/null 2>&1 &
vm=$!
trap 'kill $gw $vm 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$vmdir" "$data" "$log"' EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 0.1; done
FLUXGATE_DATA_DIR="$data" FLUXGATE_HTTP__LISTEN=127.0.0.1:0 FLUXGATE_MQTT__LISTEN=127.0.0.1:0 \
  FLUXGATE_SINKS__INFLUXDB__ENABLED=true FLUXGATE_SINKS__INFLUXDB__URL=http://127.0.0.1:$port \
  FLUXGATE_STORE__ENABLED=${STORE:-true} ${EXTRA_ENV:-} \
  ./target/release/fluxgate >"$log" 2>&1 &
gw=$!
for _ in $(seq 100); do grep -q 'listening mqtt=' "$log" && break; sleep 0.1; done
mqtt=$(grep -o 'mqtt=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
http=$(grep -o 'http=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
# The first start prints the admin key (on stdout, which goes to the same file here);
# firmware-sim uses it to provision its devices, keeping their tokens in the data dir.
export FLUXGATE_API_KEY=$(grep -o 'fgk_[A-Za-z0-9_-]*' "$log" | head -1)
tokens="$data/sim-tokens.json"
start=$(date +%s.%N)
./target/release/firmware-sim bench --transport mqtt --encoding json --qos 0 --devices 10 --messages 1000000 --mqtt "$mqtt" --http "$http" --tokens-file "$tokens"
for _ in $(seq 1200); do
  n=$(curl -s "http://$http/metrics" | awk '/^fluxgate_influxdb_points_written_total /{print $2}')
  [ "${n:-0}" -ge 1000000 ] && break; sleep 0.1
done
end=$(date +%s.%N)
echo "influx points written: $n in $(echo "$end - $start" | bc) s => $(echo "$n * 4 / ($end - $start)" | bc) readings/s, $(echo "$n / ($end - $start)" | bc) msgs/s"
curl -s "http://$http/metrics" | grep -E '^fluxgate_(influxdb_(batches|bytes|retries|dead)|dropped_[a-z]+_total|store_readings_written)' 
curl -s http://127.0.0.1:$port/internal/force_flush >/dev/null
sleep 1
echo "VM series points: $(curl -s http://127.0.0.1:$port/api/v1/export -d 'match[]=telemetry_temp' | python3 -c 'import sys,json; print(sum(len(json.loads(l)["values"]) for l in sys.stdin if l.strip()))')"
