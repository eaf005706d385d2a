#!/usr/bin/env bash
# Builds, on a machine without a GPU, what scripts/gpu_check.sh needs on the GPU machine, in target/gpu/:
#   prospect.gz         the release binary with the `cuda` feature, stripped and gzipped (80 MB -> 22 MB: a
#                       device call carries at most 64 MiB; scripts/gpu_check.sh unpacks it)
#   tokenizer/          SmolLM2-135M-Instruct's tokenizer files (scripts/fetch_smollm2.sh)
#   kto_demo_32.jsonl   the first 32 rows of LLaMA-Factory's kto_en_demo.json, rendered with SmolLM2's chat
#                       template (scripts/bench/kto_demo_to_plain.py), so that both tools read the same text
#   cuda_kernels.gz     the test binary of crates/prospect/tests/cuda_kernels.rs (GPU kernels against CPU)
#   wheels/             trl 1.16 and what it needs beyond torch, transformers and peft (pip download)
#
# A warm device machine keeps what earlier calls left, so the bundle travels in two calls:
#
#   bash scripts/gpu_bundle.sh
#   run(carry=["target/gpu/wheels"], command="python3 -V; nvidia-smi; ls /usr/local | grep cuda")
#   run(carry=["target/gpu/prospect.gz", "target/gpu/cuda_kernels.gz", "target/gpu/tokenizer",
#              "target/gpu/kto_demo_32.jsonl"],
#       command="bash scripts/gpu_check.sh", timeout_s=480)                  # the same warm machine
set -euo pipefail
cd "$(dirname "$0")/.."

G=target/gpu
PY=${PYTHON:-${PROSPECT_VENV:-/work/pyref}/bin/python}
mkdir -p "$G/tokenizer" "$G/wheels"

eval "$(bash scripts/setup_cuda.sh)"
target_dir=${CUDA_TARGET_DIR:-target/cuda-build}
CARGO_TARGET_DIR=$target_dir cargo build --release -p prospect-cli --features cuda
cp "$target_dir/release/prospect" "$G/prospect"
strip "$G/prospect"
gzip -9 -f "$G/prospect"
# The kernel test (crates/prospect/tests/cuda_kernels.rs), built here and run there by gpu_check.sh.
kernel_test=$(CARGO_TARGET_DIR=$target_dir cargo test --release -p prospect --features cuda --test cuda_kernels \
  --no-run --message-format=json | "$PY" -c "import json,sys; print([m['executable'] for m in map(json.loads, sys.stdin)
  if m.get('reason') == 'compiler-artifact' and m.get('executable') and m['target']['name'] == 'cuda_kernels'][-1])")
cp "$kernel_test" "$G/cuda_kernels"
strip "$G/cuda_kernels"
gzip -9 -f "$G/cuda_kernels"

bash scripts/fetch_smollm2.sh >/dev/null
cp target/smollm2/reference-f32/tokenizer.json target/smollm2/reference-f32/tokenizer_config.json "$G/tokenizer/"
[ -s "$G/kto_demo_32.jsonl" ] || "$PY" scripts/bench/kto_demo_to_plain.py \
  target/llamafactory/data/kto_en_demo.json target/smollm2/reference-f32 "$G/kto_demo_32.jsonl" --rows 32

# trl's own wheel, plus `datasets` and the packages it pulls in that a torch + transformers + peft machine
# may lack, for the GPU machine's Python (GPU_PYTHON_VERSION, default 3.12: ask it with `python3 -V` in the
# first, cheap call). pyarrow is the large one.
pyver=${GPU_PYTHON_VERSION:-3.12}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$G/wheels" "trl==1.16.*" datasets dill xxhash multiprocess pyarrow fsspec
du -sh "$G"/* >&2
