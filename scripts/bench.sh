#!/usr/bin/env bash
# Benchmarks: criterion micro-benchmarks of the hot path, then an end-to-end run of
# firmware-sim against a release gateway on loopback (bounded in count and time).
# Usage: scripts/bench.sh [messages] [devices]
set -euo pipefail
cd "$(dirname "$0")/.."
messages=${1:-1000000}
devices=${2:-10}

cargo bench --bench hot_path
cargo build --release -p fluxgate -p firmware-sim

data=$(mktemp -d)
log=$(mktemp)
trap 'kill "$gw" 2>/dev/null || true; wait "$gw" 2>/dev/null || true; rm -rf "$data" "$log"' EXIT
FLUXGATE_DATA_DIR="$data" FLUXGATE_HTTP__LISTEN=127.0.0.1:0 FLUXGATE_MQTT__LISTEN=127.0.0.1:0 \
  ./target/release/fluxgate >"$log" 2>&1 &
gw=$!
for _ in $(seq 100); do grep -q 'listening mqtt=' "$log" && break; sleep 0.1; done
mqtt=$(grep -o 'mqtt=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
http=$(grep -o 'http=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
# The first start prints the admin key (on stdout, which goes to the same file here);
# firmware-sim uses it to provision its devices, keeping their tokens in the data dir.
export FLUXGATE_API_KEY=$(grep -o 'fgk_[A-Za-z0-9_-]*' "$log" | head -1)
tokens="$data/sim-tokens.json"
echo "gateway: mqtt=$mqtt http=$http"

for qos in 0 1; do
  ./target/release/firmware-sim bench --transport mqtt --encoding json --qos "$qos" \
    --devices "$devices" --messages "$messages" --mqtt "$mqtt" --http "$http" --tokens-file "$tokens"
done
./target/release/firmware-sim bench --transport ws --encoding json \
  --devices "$devices" --messages "$((messages / 5))" --mqtt "$mqtt" --http "$http" --tokens-file "$tokens"
echo "store readings written: $(curl -s "http://$http/metrics" | grep '^fluxgate_store_readings_written_total' | cut -d' ' -f2)"
