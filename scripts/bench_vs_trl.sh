#!/usr/bin/env bash
# Issue 6's benchmark: the same KTO job in Prospect and in TRL 1.16, one after the other, each timed as a
# whole process with /usr/bin/time -v (wall clock, peak RSS). Results go to $OUT (default target/bench).
#
#   scripts/bench_vs_trl.sh                        # both sides
#   SIDES=prospect scripts/bench_vs_trl.sh         # one side (prospect | trl | "prospect trl")
#
# The job: KTO on SmolLM2-135M-Instruct, the first 32 rows of kto_en_demo.json, max_length 128, batch 8 =
# microbatch 4 x accumulation 2, one epoch, lr 5e-6 constant, no shuffle, f32 on CPU.
#
# Variables:
#   KTO_DEMO   LLaMA-Factory's kto_en_demo.json (the only outside input; read once, when converting)
#   MODEL      SmolLM2-135M-Instruct as a Hugging Face folder (scripts/fetch_smollm2.sh)
#   PYTHON     a Python with torch, transformers 5.24 and trl 1.16
#   PROSPECT   the prospect binary (built here in release mode when unset)
#   EXTRA      extra `--set key=value` overrides for prospect, e.g. EXTRA="precompute_ref_logps=false"
#
# The data is converted once to TRL's plain-text unpaired layout with the chat template applied
# (scripts/bench/kto_demo_to_plain.py), and both sides read that same file. (The harness was written
# before Prospect read conversational rows; both sides still see the same rendered ChatML text.)
set -euo pipefail
cd "$(dirname "$0")/.."

KTO_DEMO=${KTO_DEMO:-target/llamafactory/data/kto_en_demo.json}  # scripts/fetch_llamafactory_data.sh
MODEL=${MODEL:-target/smollm2/reference-f32}
PYTHON=${PYTHON:-/opt/pyref/bin/python}
OUT=${OUT:-target/bench}
SIDES=${SIDES:-prospect trl}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"

data="$OUT/kto_demo_32.jsonl"
if [ ! -s "$data" ]; then
  "$PYTHON" scripts/bench/kto_demo_to_plain.py "$KTO_DEMO" "$MODEL" "$data" --rows 32
fi

if [ -z "${PROSPECT:-}" ] && [[ " $SIDES " == *" prospect "* ]]; then
  cargo build --release -q -p prospect-cli
  PROSPECT=target/release/prospect
fi

cat > "$OUT/kto-bench.toml" <<TOML
model = "$MODEL"
train_data = "$data"
output_dir = "$OUT/prospect-run"
batch_size = 8
microbatch_size = 4
epochs = 1
learning_rate = 5e-6
lr_scheduler = "constant"
max_length = 128
shuffle = false
[loss]
type = "kto"
TOML

sets=()
for kv in $EXTRA; do sets+=(--set "$kv"); done

summary() { # file label load
  local wall rss
  wall=$(grep 'Elapsed (wall clock)' "$1" | awk '{print $NF}')
  rss=$(grep 'Maximum resident set size' "$1" | awk '{print $NF}')
  echo "$2: wall $wall, peak RSS $((rss / 1024)) MiB, load average before: $3"
}

for side in $SIDES; do
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  case $side in
    prospect)
      rm -rf "$OUT/prospect-run"
      /usr/bin/time -v -o "$OUT/prospect.time" "$PROSPECT" train --config "$OUT/kto-bench.toml" "${sets[@]}" \
        >"$OUT/prospect.log" 2>&1
      ;;
    trl)
      rm -rf "$OUT/trl-run"
      /usr/bin/time -v -o "$OUT/trl.time" "$PYTHON" scripts/bench/trl_kto.py "$MODEL" "$data" "$OUT/trl-run" \
        >"$OUT/trl.log" 2>&1
      ;;
  esac
  echo "$(date -u +%FT%TZ) load before $load" >>"$OUT/$side.time"
  summary "$OUT/$side.time" "$side" "$load"
done

if [ -f "$OUT/prospect-run/metrics.jsonl" ] && [ -f "$OUT/trl-run/log_history.jsonl" ]; then
  "$PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
p = [json.loads(l) for l in open(f"{out}/prospect-run/metrics.jsonl")]
t = [json.loads(l) for l in open(f"{out}/trl-run/log_history.jsonl")]
t = [e for e in t if "loss" in e and "train_runtime" not in e]
for a, b in zip(p, t):
    rel = abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12)
    print(f"step {a['step']}: prospect loss {a['loss']:.6f}  trl loss {b['loss']:.6f}  rel diff {rel:.2e}")
PY
fi
