#!/usr/bin/env bash
# Issue 14's device check, in one call of at most 8 minutes on a one-GPU machine (an H200 here), from a
# bundle built on a machine without a GPU by scripts/gpu_bundle.sh (target/gpu/: the CUDA build of
# `prospect`, SmolLM2's tokenizer, the KTO demo rows, the trl wheel). Figures go to $OUT/gpu_check.json;
# docs/BENCHMARKS.md records them with the date.
#
#   bash scripts/gpu_check.sh            # on the GPU machine, from the repository root
#
# 0. the kernel test: every CUDA kernel, forward and backward, against the CPU kernel (1e-5);
# 1. f32 KTO on a SmolLM2-135M-shaped model, 3 steps, on cuda:0 and on the CPU: per-step loss, grad_norm
#    and kl equal to 1e-3 (relative to max(1, |value|)).
# 2. bf16 KTO, 20 steps, on cuda:0: loss within 2e-2 of the f32 GPU run at every step, nothing non-finite.
# 3. Throughput: a model of Llama-3.2-1B's shape, KTO, bf16, batch 16 x 512 tokens: tokens/s, model
#    FLOP/s (6 x parameters x tokens: the policy's gradient pass on the targets, its no-grad KL pass and
#    the reference's two passes; see docs/CUDA.md), MFU against the bf16 matmul peak measured here with
#    torch, and peak GPU memory (nvidia-smi).
# 4. The step-1 job (f32, 3 steps) in TRL 1.16 on the same GPU: the whole-job time ratio.
#
# The models have random weights (transformers' initialisation, seed 0): the real SmolLM2 weights are
# larger than what a device call carries, and nothing can be downloaded there. Checks 1 and 2 compare
# two runs on the same weights, so that changes nothing they measure.
set -uo pipefail
cd "$(dirname "$0")/.."

G=${GPU_DIR:-target/gpu}
OUT=${OUT:-$G/out}
PY=${PYTHON:-python3}
BIN=$G/prospect
mkdir -p "$OUT"
[ -x "$BIN" ] || { gunzip -c "$BIN.gz" >"$BIN" && chmod +x "$BIN"; }
started=$(date +%s)
log() { echo "[$(($(date +%s) - started)) s] $*" >&2; }

# The CUDA 13 libraries the binary links: the system toolkit's, or the ones torch's wheels brought.
libs=$("$PY" - <<'PY' 2>/dev/null
import glob, os, site
dirs = set()
roots = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"] + glob.glob("/usr/local/cuda-13*/lib64")
for sp in site.getsitepackages():
    roots += glob.glob(os.path.join(sp, "nvidia", "*", "lib"))
for r in roots:
    if glob.glob(os.path.join(r, "libcublas.so.13*")) or glob.glob(os.path.join(r, "libnvrtc.so.13*")) \
            or glob.glob(os.path.join(r, "libcurand.so.10*")):
        dirs.add(r)
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
log "CUDA libraries from: $libs"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/gpu.txt" 2>&1
"$BIN" --version >/dev/null || { log "the binary does not start (missing libraries?)"; ldd "$BIN" | grep "not found"; exit 1; }

"$PY" -c "import trl" 2>/dev/null || "$PY" -m pip install -q --no-index --find-links "$G/wheels" trl >&2 ||
  log "trl could not be installed from $G/wheels: check 4 will fail"

for shape in smollm2-135m llama-3.2-1b; do
  [ -f "$G/$shape/model.safetensors" ] || "$PY" scripts/bench/make_random_llama.py "$G/$shape" "$G/tokenizer" --shape "$shape" >&2
done
[ -s "$G/rows_512.jsonl" ] || "$PY" scripts/gpu/helpers.py rows "$G/rows_512.jsonl" "$G/tokenizer" 96 512

config() { # NAME MODEL DATA MAX_LENGTH BATCH MICRO STEPS LR
  cat >"$OUT/$1.toml" <<TOML
model = "$2"
train_data = "$3"
output_dir = "$OUT/$1"
batch_size = $5
microbatch_size = $6
max_steps = $7
learning_rate = $8
lr_scheduler = "constant"
max_length = $4
shuffle = false
[loss]
type = "kto"
TOML
}
train() { # NAME DEVICE DTYPE
  rm -rf "${OUT:?}/$1"
  local t0=$(date +%s.%N)
  "$BIN" train --config "$OUT/$1.toml" --device "$2" --set "dtype=\"$3\"" >"$OUT/$1.log" 2>&1
  local rc=$?
  echo "$(echo "$(date +%s.%N) - $t0" | bc)" >"$OUT/$1.seconds"
  [ $rc -eq 0 ] || { log "$1 failed:"; tail -5 "$OUT/$1.log" >&2; }
  return $rc
}

log "0. the CUDA kernels against the CPU kernels (crates/prospect/tests/cuda_kernels.rs)"
[ -x "$G/cuda_kernels" ] || { gunzip -c "$G/cuda_kernels.gz" >"$G/cuda_kernels" && chmod +x "$G/cuda_kernels"; }
"$G/cuda_kernels" >"$OUT/cuda_kernels.log" 2>&1
kernels_rc=$?
check0=$(printf '{"ok": %s, "summary": "%s"}' "$([ $kernels_rc -eq 0 ] && echo true || echo false)" \
  "$(grep -E '^test result' "$OUT/cuda_kernels.log" | tail -1)")
log "   $check0"

smol=$G/smollm2-135m
config f32_cpu "$smol" "$G/kto_demo_32.jsonl" 512 8 4 3 1e-4
config f32_gpu "$smol" "$G/kto_demo_32.jsonl" 512 8 4 3 1e-4
log "1. f32 KTO, 3 steps, GPU and CPU"
train f32_gpu cuda:0 f32 && train f32_cpu cpu f32
check1=$("$PY" scripts/gpu/helpers.py compare "$OUT/f32_cpu/metrics.jsonl" "$OUT/f32_gpu/metrics.jsonl" loss,grad_norm,kl 1e-3 --relative)
log "   $check1"

config f32_gpu20 "$smol" "$G/kto_demo_32.jsonl" 512 8 4 20 1e-4
config bf16_gpu20 "$smol" "$G/kto_demo_32.jsonl" 512 8 4 20 1e-4
log "2. bf16 against f32, 20 steps, GPU"
train f32_gpu20 cuda:0 f32 && train bf16_gpu20 cuda:0 bf16
check2=$("$PY" scripts/gpu/helpers.py compare "$OUT/f32_gpu20/metrics.jsonl" "$OUT/bf16_gpu20/metrics.jsonl" loss,grad_norm,kl 2e-2)
log "   $check2"

log "3. throughput: Llama-3.2-1B shape, bf16, batch 16 x 512"
peak=$("$PY" scripts/gpu/helpers.py peak)
params=$("$PY" scripts/gpu/helpers.py flops "$G/llama-3.2-1b")
config tput "$G/llama-3.2-1b" "$G/rows_512.jsonl" 512 16 8 6 1e-5
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$OUT/memory.csv" 2>/dev/null &
smi=$!
train tput cuda:0 bf16
kill $smi 2>/dev/null
check3=$("$PY" - "$OUT/tput/metrics.jsonl" "$params" "$peak" "$OUT/memory.csv" <<'PY'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1])][1:]  # step 1 compiles the kernels: left out
params, peak = int(sys.argv[2]), float(sys.argv[3])
mem = [int(x) for x in open(sys.argv[4]).read().split() if x.strip().isdigit()]
tokens, seconds = sum(r["num_tokens"] for r in rows), sum(r["step_time_s"] for r in rows)
flops = 6 * params * tokens / seconds
print(json.dumps({"tokens_per_s": tokens / seconds, "model_tflops": flops / 1e12, "peak_bf16_tflops": peak,
                  "mfu": flops / 1e12 / peak, "peak_gpu_memory_mib": max(mem) if mem else None,
                  "params_counted": params, "steps_timed": len(rows)}))
PY
)
log "   $check3"

log "4. the step-1 job in TRL on the GPU"
rm -rf "$OUT/trl"
t0=$(date +%s.%N)
"$PY" scripts/bench/trl_kto.py "$smol" "$G/kto_demo_32.jsonl" "$OUT/trl" --device cuda --max-length 512 \
  --max-steps 3 --lr 1e-4 >"$OUT/trl.log" 2>&1
trl_rc=$?
trl_s=$(echo "$(date +%s.%N) - $t0" | bc)
check4=$(printf '{"ok": %s, "trl_s": %s, "prospect_s": %s, "ratio_trl_over_prospect": %s}' \
  "$([ $trl_rc -eq 0 ] && echo true || echo false)" "$trl_s" "$(cat "$OUT/f32_gpu.seconds")" \
  "$(echo "scale=3; $trl_s / $(cat "$OUT/f32_gpu.seconds")" | bc)")
log "   $check4"

cat >"$OUT/gpu_check.json" <<JSON
{"date": "$(date -u +%F)", "gpu": "$(head -1 "$OUT/gpu.txt")",
 "cuda_kernels_vs_cpu": ${check0:-null},
 "f32_gpu_vs_cpu": ${check1:-null},
 "bf16_vs_f32": ${check2:-null},
 "throughput_llama_1b_shape": ${check3:-null},
 "trl_same_job": ${check4:-null}}
JSON
cat "$OUT/gpu_check.json"
