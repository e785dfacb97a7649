#!/usr/bin/env bash
# The one test command (README, CI): installs what the tests need, then runs formatting,
# lints and every test of the workspace. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# --- what the tests need -------------------------------------------------------------
# SQLite is bundled (rusqlite), and the MQTT/WebSocket peers are real Rust clients
# (rumqttc, tokio-tungstenite). System packages the suites need are listed here so a
# fresh machine gets them from this one command:
# - victoria-metrics: a real InfluxDB v2 write API for tests/influx.rs (each test starts
#   its own instance on a free loopback port).
# - chromium, chromium-driver: the dashboard's end-to-end test in a real headless browser.
apt_packages=(victoria-metrics chromium chromium-driver)
if [ "${#apt_packages[@]}" -gt 0 ]; then
  missing=()
  for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
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
