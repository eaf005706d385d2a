"""The transformers side of scripts/bench/generate_vs_transformers.sh: greedy `generate` on the prompts of a
JSONL file, 128 new tokens, at a given batch size (left padding, as transformers wants for a decoder), f32 on
the CPU with torch's default threads. Prints the generated tokens (up to and including EOS) and the seconds
spent in `generate` (loading excluded). Pins: torch 2.15.0, transformers 5.24.0.

    python hf_generate.py MODEL_DIR PROMPTS.jsonl BATCH
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    model_dir, prompts, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    texts = [json.loads(line)["prompt"] for line in open(prompts)]
    tokens, seconds = 0, 0.0
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], return_tensors="pt", padding=True)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=128, do_sample=False, pad_token_id=tok.pad_token_id)
        seconds += time.perf_counter() - start
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            n = next((k + 1 for k, t in enumerate(row) if t == tok.eos_token_id), len(row))
            tokens += n
    print(json.dumps({"batch": batch, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}))


if __name__ == "__main__":
    main()
