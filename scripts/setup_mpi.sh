#!/usr/bin/env bash
# What the `mpi` feature needs to build and run, from Debian: Open MPI (headers, libraries, mpirun) and
# libclang for rsmpi's bindings. Idempotent; needs root (or sudo) the first time.
#
#   bash scripts/setup_mpi.sh
#   cargo build --release -p prospect-cli --features mpi
#   mpirun -np 2 target/release/prospect train --config configs/kto-tiny.toml
set -euo pipefail
need=()
command -v mpicc >/dev/null || need+=(libopenmpi-dev)
command -v mpirun >/dev/null || need+=(openmpi-bin)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 \
  || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]} (Debian)"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}" clang
fi
mpirun --version | head -1
