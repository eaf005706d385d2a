#!/usr/bin/env bash
# Data parallelism on one machine (docs/BENCHMARKS.md): the SmolLM2-135M KTO job (configs/smollm2-kto.toml,
# first 4 steps, batch 8) as 1 process × 2 threads and as 2 MPI ranks × 1 thread, one after the other,
# ROUNDS times. Prints wall times, per-step times and the share of each step spent in collective calls.
#
#   scripts/bench/data_parallel.sh [ROUNDS]
#
# Needs: target/release/prospect built with `--features mpi` (after scripts/setup_mpi.sh),
# target/smollm2/reference-f32 and target/llamafactory/data/kto_en_demo.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
PROSPECT=${PROSPECT:-target/release/prospect}
OUT=${OUT:-target/bench/data-parallel}
rounds=${1:-2}
common=(--config configs/smollm2-kto.toml --set model=target/smollm2/reference-f32 --set max_steps=4)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
summary() { # label dir seconds
  python3 - "$1" "$2/metrics.jsonl" "$3" <<'PY'
import json, sys
label, path, wall = sys.argv[1], sys.argv[2], float(sys.argv[3])
steps = [json.loads(l) for l in open(path)]
t = [s["step_time_s"] for s in steps]
c = [s.get("comm_time_s") for s in steps]
share = "" if c[0] is None else ", collective calls %.1f%% of step time" % (100 * sum(c) / sum(t))
print(f"{label}: wall {wall:.1f} s, steps (s) {' '.join('%.2f' % x for x in t)}, sum {sum(t):.1f} s{share}")
PY
}
for round in $(seq "$rounds"); do
  rm -rf "$OUT"; mkdir -p "$OUT"
  start=$(date +%s.%N)
  RAYON_NUM_THREADS=2 "$PROSPECT" train "${common[@]}" --set output_dir="$OUT/one" 2> "$OUT/one.log"
  summary "round $round, 1 process × 2 threads" "$OUT/one" "$(python3 -c "import sys; print(float(sys.argv[1]) - float(sys.argv[2]))" "$(date +%s.%N)" "$start")"
  start=$(date +%s.%N)
  mpirun --oversubscribe -np 2 --mca btl self,vader -x RAYON_NUM_THREADS=1 \
    "$PROSPECT" train "${common[@]}" --set output_dir="$OUT/two" 2> "$OUT/two.log"
  summary "round $round, 2 ranks × 1 thread" "$OUT/two" "$(python3 -c "import sys; print(float(sys.argv[1]) - float(sys.argv[2]))" "$(date +%s.%N)" "$start")"
  cmp <(python3 -c "import json; [print(json.loads(l)['loss'], json.loads(l)['grad_norm']) for l in open('$OUT/one/metrics.jsonl')]") \
      <(python3 -c "import json; [print(json.loads(l)['loss'], json.loads(l)['grad_norm']) for l in open('$OUT/two/metrics.jsonl')]") \
    && echo "  same loss and grad_norm at every step"
done
