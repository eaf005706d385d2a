#!/usr/bin/env bash
# Issue 12, item 5: greedy generation of 128 new tokens on SmolLM2-135M-Instruct (f32, CPU), Prospect's
# `prospect generate` against transformers' `generate` (scripts/bench/hf_generate.py), at batch 1 and 8, on
# the same 8 prompts: the first 8 distinct user messages under 300 characters of LLaMA-Factory's
# kto_en_demo.json, as plain text (no chat template on either side).
#
#   PROSPECT=target/release/prospect bash scripts/bench/generate_vs_transformers.sh
#
# Prospect's figure is its whole process minus a 1-token run (loading and prefill); transformers' is the
# time inside `generate`. Both sides count the generated tokens up to and including EOS.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-target/smollm2/reference-f32}
PYTHON=${PYTHON:-${PROSPECT_VENV:-/work/pyref}/bin/python}
PROSPECT=${PROSPECT:-target/release/prospect}
OUT=${OUT:-target/bench}
mkdir -p "$OUT"
"$PYTHON" - "$OUT/gen_prompts.jsonl" <<'PY'
import json, sys
rows = json.load(open("target/llamafactory/data/kto_en_demo.json"))
seen = []
for r in rows:
    u = r["messages"][0]["content"]
    if len(u) < 300 and u not in seen:
        seen.append(u)
    if len(seen) == 8:
        break
open(sys.argv[1], "w").writelines(json.dumps({"prompt": u}) + "\n" for u in seen)
PY
secs() { /usr/bin/time -f "%e" "$PROSPECT" generate --model "$MODEL" --prompts "$OUT/gen_prompts.jsonl" \
  --output "$OUT/gen_$1_$2.jsonl" --batch-size "$1" --max-new-tokens "$2" 2>&1 >/dev/null | tail -1; }
for b in 1 8; do
  load=$(secs "$b" 1)
  total=$(secs "$b" 128)
  # completion_ids leave the EOS out (finish = "eos"): it is counted, as transformers' side counts it.
  tokens=$("$PYTHON" -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]
print(sum(len(x['completion_ids']) + (x['finish'] == 'eos') for x in r))" \
    "$OUT/gen_${b}_128.jsonl")
  echo "prospect batch $b: $tokens tokens, $(echo "scale=1; $tokens / ($total - $load)" | bc) tokens/s ($total s, $load s loading)"
  echo "transformers: $("$PYTHON" scripts/bench/hf_generate.py "$MODEL" "$OUT/gen_prompts.jsonl" "$b" 2>/dev/null | tail -1)"
done
