#!/usr/bin/env bash
# Fuzz Prospect's readers of untrusted bytes: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Builds crates/prospect-fuzz in release, then runs every target (data, parquet, gguf, safetensors, tokenizer,
# config; or those named) for SECONDS each (default 60), all targets at once, one process each, under
# a virtual-memory cap (FUZZ_MEM_KB, default 8 GiB) so that an unbounded allocation is a finding, not a
# swapping machine. Prints executions, panics, slow runs (> 1 s), hangs (> 3 s) and crashes per target,
# then every distinct finding; inputs land in target/fuzz/findings/. Exits 1 on a finding that is not
# listed in tests/fixtures/bad/pending/KNOWN. CI runs `scripts/fuzz.sh 60` as a smoke test.
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
cargo build --release -q -p prospect-fuzz
echo "build: $(( $(date +%s) - start )) s"

mem_kb="${FUZZ_MEM_KB:-8388608}"
(
  ulimit -v "$mem_kb"
  exec target/release/prospect-fuzz --seconds "$seconds" "${targets[@]}" "${extra[@]}"
)
