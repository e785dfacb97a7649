#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/) for a bounded time: the JSON and postcard decoders,
# the store's chunk codec, the sink buffer's record reader and the InfluxQL parser.
# libFuzzer's instrumentation flags are nightly-only; this machine has only the stable
# toolchain (rustup cannot download another), so without a nightly the script runs the
# stable compiler in its bootstrap mode (RUSTC_BOOTSTRAP=1), which accepts them. It builds the targets with the
# dev profile plus optimisation and without AddressSanitizer (safe Rust: the fuzzers hunt
# panics, overflows and runaway allocations), which keeps the build a few minutes on two
# cores instead of half an hour. cargo-fuzz is installed from crates.io when missing.
#
# New inputs that the fuzzer finds go to a temporary directory; the committed seeds in
# fuzz/corpus/ are only read. A crash fails the run and leaves its input in
# fuzz/artifacts/.
#
# Usage: scripts/fuzz.sh [seconds per target] (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
targets=(proto_json proto_frame store_chunk sink_buffer influxql)

if cargo +nightly --version >/dev/null 2>&1; then
  toolchain=(+nightly)
else
  toolchain=()
  export RUSTC_BOOTSTRAP=1
  echo "no nightly toolchain: using the stable compiler with RUSTC_BOOTSTRAP=1"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
# The fuzz crate is a workspace of its own with its own target directory: a shared
# CARGO_TARGET_DIR would mix nightly sanitizer builds into the stable ones.
unset CARGO_TARGET_DIR
cd fuzz
cargo "${toolchain[@]}" fuzz build --sanitizer none --dev
new=$(mktemp -d)
trap 'rm -rf "$new"' EXIT
for t in "${targets[@]}"; do
  echo "fuzzing $t for ${seconds}s"
  mkdir -p "$new/$t"
  if ! cargo "${toolchain[@]}" fuzz run --sanitizer none --dev "$t" "$new/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$new/$t.log" 2>&1; then
    tail -40 "$new/$t.log"
    echo "fuzz target $t failed; its input is in fuzz/artifacts/$t"
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|new_units_added)' "$new/$t.log" || true
done
echo "fuzzing: ${#targets[@]} targets, ${seconds}s each, no crash"
