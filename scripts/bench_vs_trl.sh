#!/usr/bin/env bash
# The KTO job of issues 6 and 12 in Prospect and in TRL 1.16, as a user runs it: the conversational rows as
# they are, each tool at its defaults, plus TRL tuned for speed. The tools alternate over ROUNDS rounds;
# each run is one whole process timed with /usr/bin/time -v (wall clock, peak RSS). It prints the medians,
# the ratios, and the CPU with its AVX-512 flags. Results go to $OUT (default target/bench).
#
#   scripts/bench_vs_trl.sh                          # 3 rounds of prospect, trl, trl-tuned
#   ROUNDS=1 SIDES="prospect" scripts/bench_vs_trl.sh
#
# The job: KTO on SmolLM2-135M-Instruct (f32, CPU), the first 32 rows of LLaMA-Factory's kto_en_demo.json
# (`messages` + `label`), max_length 128, batch 8 = microbatch 4 x accumulation 2, one epoch, lr 5e-6
# constant, file order. Each tool renders the messages with the model's chat template itself:
# - Prospect reads the 32 rows as LLaMA-Factory wrote them (a JSON array of `messages` + `label`);
# - TRL reads them as its conversational unpaired layout: `prompt` = the messages before the last,
#   `completion` = [the last], `label` (scripts/bench/kto_demo_to_trl.py; TRL takes no `messages` rows).
# Sides:
# - prospect:  `prospect train` with the config below and Prospect's defaults otherwise;
# - trl:       KTOTrainer with TRL's defaults otherwise (gradient checkpointing on, the reference model live);
# - trl-tuned: the same with gradient_checkpointing=False and precompute_ref_log_probs=True.
#
# Variables: KTO_DEMO (kto_en_demo.json), MODEL (SmolLM2 folder, scripts/fetch_smollm2.sh), PYTHON (torch,
# transformers 5.24, trl 1.16: scripts/requirements-ref.txt), PROSPECT (the binary; built when unset),
# ROUNDS, SIDES, OUT, EXTRA (`--set` overrides for prospect, e.g. EXTRA="precompute_ref_logps=false").
set -euo pipefail
cd "$(dirname "$0")/.."

KTO_DEMO=${KTO_DEMO:-target/llamafactory/data/kto_en_demo.json}  # scripts/fetch_llamafactory_data.sh
MODEL=${MODEL:-target/smollm2/reference-f32}
PYTHON=${PYTHON:-${PROSPECT_VENV:-/work/pyref}/bin/python}
OUT=${OUT:-target/bench}
SIDES=${SIDES:-prospect trl trl-tuned}
ROUNDS=${ROUNDS:-3}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"

"$PYTHON" scripts/bench/kto_demo_to_trl.py "$KTO_DEMO" "$OUT/kto_demo_32.json" "$OUT/kto_demo_32_trl.jsonl" --rows 32

if [ -z "${PROSPECT:-}" ] && [[ " $SIDES " == *" prospect "* ]]; then
  cargo build --release -q -p prospect-cli
  PROSPECT=target/release/prospect
fi

cat > "$OUT/kto-bench.toml" <<TOML
model = "$MODEL"
train_data = "$OUT/kto_demo_32.json"
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

run_side() { # SIDE ROUND
  local t="$OUT/$1.$2.time"
  case $1 in
    prospect)
      rm -rf "$OUT/prospect-run"
      /usr/bin/time -v -o "$t" "$PROSPECT" train --config "$OUT/kto-bench.toml" "${sets[@]}" >"$OUT/prospect.log" 2>&1 ;;
    trl)
      rm -rf "$OUT/trl-run"
      /usr/bin/time -v -o "$t" "$PYTHON" scripts/bench/trl_kto.py "$MODEL" "$OUT/kto_demo_32_trl.jsonl" "$OUT/trl-run" \
        >"$OUT/trl.log" 2>&1 ;;
    trl-tuned)
      rm -rf "$OUT/trl-tuned-run"
      /usr/bin/time -v -o "$t" "$PYTHON" scripts/bench/trl_kto.py "$MODEL" "$OUT/kto_demo_32_trl.jsonl" \
        "$OUT/trl-tuned-run" --tuned >"$OUT/trl-tuned.log" 2>&1 ;;
  esac
  echo "$1 round $2: $(grep 'Elapsed (wall clock)' "$t" | awk '{print $NF}'), peak RSS $(($(grep 'Maximum resident' "$t" | awk '{print $NF}') / 1024)) MiB" >&2
}

for round in $(seq 1 "$ROUNDS"); do
  for side in $SIDES; do run_side "$side" "$round"; done
done

"$PYTHON" - "$OUT" "$ROUNDS" $SIDES <<'PY'
import json, statistics, sys
out, rounds, sides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def seconds(s):
    parts = [float(p) for p in s.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))

def read(side, r):
    text = open(f"{out}/{side}.{r}.time").read()
    wall = next(l for l in text.splitlines() if "Elapsed (wall clock)" in l).split()[-1]
    rss = int(next(l for l in text.splitlines() if "Maximum resident" in l).split()[-1])
    return seconds(wall), rss / 1024

flags = open("/proc/cpuinfo").read()
model = next(l.split(":", 1)[1].strip() for l in flags.splitlines() if l.startswith("model name"))
avx512 = sorted({f for l in flags.splitlines() if l.startswith("flags") for f in l.split() if f.startswith("avx512")})
print(f"CPU: {model}; {len([l for l in flags.splitlines() if l.startswith('processor')])} logical CPUs; "
      f"AVX-512: {' '.join(avx512) or 'none'}")
med = {}
for side in sides:
    runs = [read(side, r) for r in range(1, rounds + 1)]
    med[side] = (statistics.median(w for w, _ in runs), statistics.median(m for _, m in runs))
    print(f"{side:>10}: median {med[side][0]:.1f} s, peak RSS {med[side][1]:,.0f} MiB "
          f"(runs: {', '.join(f'{w:.1f} s' for w, _ in runs)})")
if "prospect" in med:
    for other in ("trl", "trl-tuned"):
        if other in med:
            print(f"{other} / prospect: time {med[other][0] / med['prospect'][0]:.2f}x, "
                  f"RSS prospect / {other} {med['prospect'][1] / med[other][1]:.2f}")
try:
    p = [json.loads(l) for l in open(f"{out}/prospect-run/metrics.jsonl")]
    t = [e for e in map(json.loads, open(f"{out}/trl-run/log_history.jsonl")) if "loss" in e and "train_runtime" not in e]
    for a, b in zip(p, t):
        print(f"step {a['step']}: prospect loss {a['loss']:.6f}, trl loss {b['loss']:.6f}")
except FileNotFoundError:
    pass
PY
