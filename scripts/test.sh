#!/usr/bin/env bash
# The one test command (README, CI): installs what the tests need, then runs formatting,
# lints and every test of the workspace. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# --- what the tests need -------------------------------------------------------------
# SQLite is bundled (rusqlite); the MQTT/WebSocket peers are real clients (rumqttc,
# tokio-tungstenite, Mosquitto's and paho's MQTT clients). System packages the suites
# need are listed here so a fresh machine gets them from this one command:
# - victoria-metrics: a real InfluxDB v2 write API for tests/influx.rs (each test starts
#   its own instance on a free loopback port).
# - chromium, chromium-driver: the dashboard's end-to-end test in a real headless browser.
# - influxdb (1.6.7): the reference for the InfluxQL read API (tests/influxql.rs starts its
#   own instance on free loopback ports).
# - prometheus (2.42, with promtool): scrapes a test gateway, runs the dashboards' PromQL
#   and checks /metrics and the alert rules (tests/prometheus.rs).
# - mosquitto-clients: mosquitto_pub/mosquitto_sub as third-party MQTT devices
#   (tests/mqtt_clients.rs).
# - nats-server (2.9), postgresql (15): cluster mode's engines (tests/cluster_*.rs start
#   their own JetStream cluster and PostgreSQL on free loopback ports).
apt_packages=(victoria-metrics chromium chromium-driver influxdb prometheus mosquitto-clients nats-server postgresql)
if [ "${#apt_packages[@]}" -gt 0 ]; then
  missing=()
  for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
fi
# Grafana's dashboard models (generated from its published schemas) and a YAML parser
# for scripts/check_dashboards.py, which tests/influxql.rs runs.
if ! python3 -c "import grafana_foundation_sdk, yaml" >/dev/null 2>&1; then
  log "installing grafana-foundation-sdk and PyYAML (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check "grafana-foundation-sdk==1769699998!10.1.0" pyyaml
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
fi
# paho-mqtt (PyPI): the Python MQTT client of tests/clients/paho_device.py.
if ! python3 -c 'import paho.mqtt' >/dev/null 2>&1; then
  log "installing paho-mqtt (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check paho-mqtt
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# --- checks --------------------------------------------------------------------------
log "rustfmt"
cargo fmt --all -- --check

log "clippy (-D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "build (no_std check of the wire-format crate)"
cargo build -p fluxgate-proto --no-default-features --locked

log "tests"
cargo nextest run --workspace --locked --no-fail-fast

log "doc tests"
cargo test --workspace --doc --locked

log "schemathesis (property-based REST tests against a live gateway)"
scripts/schemathesis.sh

log "fuzzing (cargo fuzz, bounded: 45 s per target)"
scripts/fuzz.sh 45
