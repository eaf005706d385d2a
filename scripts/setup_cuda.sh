#!/usr/bin/env bash
# Installs what `cargo build --features prospect-cli/cuda` needs on a machine with no GPU and no CUDA
# toolkit, from NVIDIA's PyPI wheels, into target/cuda/ (idempotent), then prints the variables the build
# reads as `export` lines:
#
#   eval "$(bash scripts/setup_cuda.sh)"
#   cargo build --release -p prospect-cli --features cuda
#
# What the build reads, and why:
# - nvcc (CUDA 13.0) on PATH: candle-kernels compiles its .cu files to PTX and a few to a static library;
# - CUDA_COMPUTE_CAP=90: there is no `nvidia-smi` here to ask. PTX for compute_90 is JIT-compiled by the
#   driver on Hopper and on any later GPU. Override with CUDA_COMPUTE_CAP=80 (Ampere) and so on;
# - CUDARC_CUDA_VERSION=13000: cudarc's bindings for the CUDA 13.0 API. The GPU machine's driver is CUDA 13;
#   a 13.0 build runs on any 13.x driver, while PTX from a newer nvcc than the driver is refused;
# - CUDA_HOME: cudarc links libcuda, libnvrtc, libcurand, libcublas and libcublasLt. The wheels ship the
#   last four; libcuda belongs to the driver, so a link-time stub with the driver API's symbol names and
#   the soname `libcuda.so.1` is built here (as the toolkit's own lib/stubs/libcuda.so is). At run time the
#   binary loads the GPU machine's real libraries (LD_LIBRARY_PATH, see scripts/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

ver=13.0
root=$PWD/target/cuda
cu=$root/py/nvidia/cu13
wheels=(
  "nvidia-cuda-nvcc==$ver.*" "nvidia-cuda-crt==$ver.*" "nvidia-nvvm==$ver.*" "nvidia-cuda-runtime==$ver.*"
  "nvidia-cuda-cccl==$ver.*" "nvidia-cuda-nvrtc==$ver.*" "nvidia-cublas==$ver.*" "nvidia-curand==10.4.*"
)

if [ ! -x "$cu/bin/nvcc" ] || [ ! -e "$cu/lib/libcublas.so.13" ]; then
  echo "== installing the CUDA $ver toolchain from PyPI into $root (about 700 MB, once)" >&2
  mkdir -p "$root"
  python3 -m pip install -q --no-cache-dir --disable-pip-version-check --no-deps --upgrade \
    --target "$root/py" "${wheels[@]}" >&2
fi

# Unversioned names for the linker (`-lcublas` looks for libcublas.so).
for lib in cudart nvrtc cublas cublasLt curand; do
  real=$(ls "$cu/lib/lib$lib.so."* 2>/dev/null | grep -v "\.alt\." | head -1)
  [ -n "$real" ] || { echo "setup_cuda: lib$lib.so.* missing from $cu/lib" >&2; exit 1; }
  ln -sf "$(basename "$real")" "$cu/lib/lib$lib.so"
done

# The libcuda link stub: one empty function per driver-API name that cudarc's bindings declare.
stub=$cu/lib/stubs/libcuda.so
if [ ! -e "$stub" ]; then
  src=$(cargo metadata --format-version 1 --features prospect-cli/cuda 2>/dev/null |
    python3 -c "import json,sys; print(next(p['manifest_path'] for p in json.load(sys.stdin)['packages'] if p['name']=='cudarc'))" |
    xargs dirname)/src/driver/sys/mod.rs
  [ -f "$src" ] || { echo "setup_cuda: cudarc's driver bindings not found ($src); run cargo fetch" >&2; exit 1; }
  mkdir -p "$cu/lib/stubs"
  grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$src" | awk '{print "void " $4 "(void) {}"}' | sort -u >"$root/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$root/libcuda_stub.c"
  # Under its soname too, so that a test binary loads here for the NVRTC-only test (docs/CUDA.md); the
  # stub's functions do nothing, so nothing else can run on it.
  ln -sf libcuda.so "$cu/lib/stubs/libcuda.so.1"
  echo "== link stub $stub: $(wc -l <"$root/libcuda_stub.c") driver symbols" >&2
fi

echo "export PATH=\"$cu/bin:\$PATH\""
echo "export CUDA_HOME=\"$cu\""
echo "export CUDA_COMPUTE_CAP=\"\${CUDA_COMPUTE_CAP:-90}\""
echo "export CUDARC_CUDA_VERSION=13000"
