#!/usr/bin/env bash
# LoRA's memory and speed (docs/BENCHMARKS.md), each job timed as a whole process with /usr/bin/time -v.
#
#   scripts/bench/lora_memory.sh smollm2      # SmolLM2-135M KTO job: full fine-tuning vs LoRA (r 16, attention)
#   scripts/bench/lora_memory.sh 1.7b         # SmolLM2-1.7B's shape, random weights: LoRA KTO, batch 8 x 256,
#                                             # base in f32, bf16 and q8_0 (1.7b-q8: q8_0 only)
#
# Needs: target/release/prospect (cargo build --release -p prospect-cli), target/smollm2/reference-f32
# (scripts/fetch_smollm2.sh), target/llamafactory/data/kto_en_demo.json (scripts/fetch_llamafactory_data.sh),
# and for 1.7b the random model (scripts/bench/make_random_llama.py target/bench/smollm2-1.7b-random
# target/smollm2/reference-f32). Results: target/bench/lora-*/ (time.txt, metrics.jsonl).
set -euo pipefail
cd "$(dirname "$0")/../.."
PROSPECT=${PROSPECT:-target/release/prospect}
OUT=${OUT:-target/bench}
LORA_ATTN=(--set lora.r=16 --set lora.alpha=32 --set 'lora.target_modules=["q_proj","k_proj","v_proj","o_proj"]')

job() { # name, then prospect train arguments
  local name=$1; shift
  local dir="$OUT/lora-$name"
  rm -rf "$dir"; mkdir -p "$dir"
  /usr/bin/time -v "$PROSPECT" train --config configs/smollm2-kto.toml --set output_dir="$dir/run" "$@" \
    2> "$dir/time.txt" > "$dir/stdout.txt" || { tail -20 "$dir/time.txt"; exit 1; }
  cp "$dir/run/metrics.jsonl" "$dir/"
  local rss wall
  rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$dir/time.txt")
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$dir/time.txt")
  local steps
  steps=$(python3 -c "import json,sys; print(' '.join('%.1f' % json.loads(l)['step_time_s'] for l in open('$dir/metrics.jsonl') if 'step_time_s' in l))")
  echo "$name: peak RSS ${rss} MiB, wall $wall, step times (s): $steps"
}

case "${1:-smollm2}" in
  smollm2)
    common=(--set model=target/smollm2/reference-f32 --set max_steps=4)
    job smollm2-full "${common[@]}"
    job smollm2-lora "${common[@]}" "${LORA_ATTN[@]}"
    job smollm2-lora-bf16 "${common[@]}" "${LORA_ATTN[@]}" --set lora.base_dtype=bf16
    job smollm2-lora-q8 "${common[@]}" "${LORA_ATTN[@]}" --set lora.base_dtype=q8_0
    ;;
  1.7b)
    common=(--set model="$OUT/smollm2-1.7b-random" --set max_steps=2 --set max_length=256 --set microbatch_size=4)
    job 1.7b-lora-f32 "${common[@]}" "${LORA_ATTN[@]}"
    job 1.7b-lora-bf16 "${common[@]}" "${LORA_ATTN[@]}" --set lora.base_dtype=bf16
    job 1.7b-lora-q8 "${common[@]}" "${LORA_ATTN[@]}" --set lora.base_dtype=q8_0
    ;;
  1.7b-q8)
    common=(--set model="$OUT/smollm2-1.7b-random" --set max_steps=2 --set max_length=256 --set microbatch_size=4)
    job 1.7b-lora-q8 "${common[@]}" "${LORA_ATTN[@]}" --set lora.base_dtype=q8_0
    ;;
  *) echo "usage: $0 smollm2|1.7b|1.7b-q8"; exit 2 ;;
esac
