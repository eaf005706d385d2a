#!/usr/bin/env bash
# Fuzz Prospect's readers of untrusted bytes: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Builds crates/prospect-fuzz (dev profile: every dependency is already at opt-level 3 there and shared
# with `cargo test`, so a warm target builds it in seconds, and Prospect's own code keeps its overflow
# checks; FUZZ_PROFILE=release for a release build, cold ~30 min on 2 vCPUs), then runs every target (data, parquet, gguf, safetensors, tokenizer,
# config; or those named) for SECONDS each (default 60), all targets at once, one process each, under
# a virtual-memory cap (FUZZ_MEM_KB, default 8 GiB) so that an unbounded allocation is a finding, not a
# swapping machine. Prints executions, panics, slow runs (> 1 s), hangs (> 3 s) and crashes per target,
# then every distinct finding; inputs land in target/fuzz/findings/. Exits 1 on a finding that is not
# listed in tests/fixtures/bad/pending/KNOWN. CI runs `scripts/fuzz.sh 30` as a smoke test.
#
# Extra options after the targets go to the harness, e.g. `scripts/fuzz.sh 600 data -- --seed 7`.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=()
while [[ $# -gt 0 && "$1" != "--" ]]; do targets+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
extra=("$@")

start=$(date +%s)
profile="${FUZZ_PROFILE:-dev}"
# FUZZ_FEATURES: build with the test build's features (CI: prospect/mpi), so that the dependencies it
# already compiled are reused instead of rebuilt with another feature set.
cargo build --profile "$profile" -q -p prospect-fuzz ${FUZZ_FEATURES:+--features "$FUZZ_FEATURES"}
echo "build ($profile): $(( $(date +%s) - start )) s"
bin_dir=debug; [[ "$profile" != dev ]] && bin_dir="$profile"

mem_kb="${FUZZ_MEM_KB:-8388608}"
(
  ulimit -v "$mem_kb"
  exec "target/$bin_dir/prospect-fuzz" --seconds "$seconds" "${targets[@]}" "${extra[@]}"
)
