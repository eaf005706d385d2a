"""A Llama-family model folder with random weights and a given shape, for memory and speed measurements
(docs/BENCHMARKS.md). The tokenizer files are copied from TOKENIZER_DIR (its vocabulary must fit).

    python scripts/bench/make_random_llama.py OUT_DIR TOKENIZER_DIR --shape smollm2-1.7b

Shapes: smollm2-135m (hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate 1536, vocab 49152, tied, as
HuggingFaceTB/SmolLM2-135M-Instruct's config.json; scripts/gpu_check.sh trains it where the real weights
cannot be carried); smollm2-1.7b (hidden 2048, 24 layers, 32 heads, intermediate 8192, vocab 49152, tied embeddings,
as HuggingFaceTB/SmolLM2-1.7B's config.json); llama-3.2-1b (hidden 2048, 16 layers, 32 heads / 8 KV heads,
intermediate 8192, vocab 128256, tied). Weights: transformers' own initialisation, seed 0, saved as f32
safetensors. Pins: torch 2.15.0, transformers 5.24.0.
"""

import argparse
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "smollm2-1.7b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                         intermediate_size=8192, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=130000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("tokenizer_dir")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-1.7b")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok_dir, out = Path(args.tokenizer_dir), Path(args.out)
    config = LlamaConfig(**SHAPES[args.shape], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"]:
        if (tok_dir / name).exists() and name != "generation_config.json":
            shutil.copy(tok_dir / name, out / name)
    print(f"{args.shape}: {sum(p.numel() for p in model.parameters()):,} parameters -> {out}")


if __name__ == "__main__":
    main()
