#!/usr/bin/env python
"""Write tests/fixtures/gguf_blocks.json: random ggml blocks of every type `prospect import gguf` reads, and
what llama.cpp's own Python reader (gguf-py) dequantizes them to. The Rust test
crates/prospect/tests/gguf_blocks.rs feeds the same bytes to `import::dequant::dequantize`.

This complements the hand-built blocks in crates/prospect/src/import/dequant.rs (a few values worked out by
hand per type) with every value of whole random blocks, for the types the SmolLM2 wheel does not contain.

Re-run (from the repository root), with the venv scripts/fetch_smollm2.sh builds (pins below):

    target/smollm2/venv/bin/python scripts/make_gguf_block_fixtures.py
"""

import json
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

PINS = {"gguf": "0.19.0", "numpy": "2.4.6"}
from importlib.metadata import version

for pkg, want in PINS.items():
    assert version(pkg) == want, f"{pkg} {version(pkg)} installed, fixture pinned to {want}"

OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/gguf_blocks.json"
rng = np.random.default_rng(0)


def f16(x):
    return np.array([x], dtype=np.float16).tobytes()


# Byte offsets of each block's f16 fields (scales `d`, minimums `m`/`dmin`), from ggml-common.h. Random
# bytes there could be NaN or infinity; these get finite random values instead.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
BLOCKS = 2

cases = []
for t in [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]:
    block_size, type_size = gguf.GGML_QUANT_SIZES[t]
    if t in (T.F16, T.BF16):
        values = rng.standard_normal(16).astype(np.float32)
        raw = values.astype(np.float16).tobytes() if t == T.F16 else (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    else:
        blocks = []
        for _ in range(BLOCKS):
            b = bytearray(rng.integers(0, 256, type_size, dtype=np.uint8).tobytes())
            for off in F16_FIELDS[t]:
                b[off:off + 2] = f16(rng.uniform(-0.1, 0.1) if off == F16_FIELDS[t][0] else rng.uniform(0, 0.05))
            blocks.append(bytes(b))
        raw = b"".join(blocks)
    want = dequantize(np.frombuffer(raw, dtype=np.uint8), t).astype(np.float32).reshape(-1)
    cases.append({"type": t.name, "hex": raw.hex(), "values": [float(x) for x in want]})

fixture = {
    "generator": "scripts/make_gguf_block_fixtures.py",
    "versions": PINS,
    "python": sys.version.split()[0],
    "cases": cases,
}
OUT.write_text(json.dumps(fixture) + "\n")
print(f"wrote {OUT}: {[(c['type'], len(c['values'])) for c in cases]}")
