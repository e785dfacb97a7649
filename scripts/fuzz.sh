#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/) for a bounded time: the JSON and postcard decoders,
# the store's chunk codec and the sink buffer's record reader. Needs a nightly toolchain
# (libFuzzer and the sanitizer flags are nightly-only) and cargo-fuzz (installed from
# crates.io when missing). Without a nightly toolchain it says so and exits 0: the
# decoders are also property-tested on stable (proto, src/store/chunk.rs,
# src/sink/buffer/tests.rs).
#
# New inputs that the fuzzer finds go to a temporary directory; the committed seeds in
# fuzz/corpus/ are only read. A crash fails the run and leaves its input in
# fuzz/artifacts/.
#
# Usage: scripts/fuzz.sh [seconds per target] (default 45)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-45}
targets=(proto_json proto_frame store_chunk sink_buffer influxql)

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "SKIPPED: cargo fuzz needs a nightly toolchain, and this machine has none (rustup cannot download one here)"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
# The fuzz crate is a workspace of its own with its own target directory: a shared
# CARGO_TARGET_DIR would mix nightly sanitizer builds into the stable ones.
unset CARGO_TARGET_DIR
cd fuzz
cargo +nightly fuzz build
new=$(mktemp -d)
trap 'rm -rf "$new"' EXIT
for t in "${targets[@]}"; do
  echo "fuzzing $t for ${seconds}s"
  mkdir -p "$new/$t"
  if ! cargo +nightly fuzz run "$t" "$new/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$new/$t.log" 2>&1; then
    tail -40 "$new/$t.log"
    echo "fuzz target $t failed; its input is in fuzz/artifacts/$t"
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|new_units_added)' "$new/$t.log" || true
done
echo "fuzzing: ${#targets[@]} targets, ${seconds}s each, no crash"
