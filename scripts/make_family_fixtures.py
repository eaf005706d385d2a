#!/usr/bin/env python
"""Reference fixtures for the GPT-2 and GPT-NeoX (Pythia) families: tiny random models and what `transformers`
computes with them.

Run from the repository root, after `scripts/make_fixtures.py` has written `tests/fixtures/tiny-llama/` (whose
tokenizer files the new models reuse):

    pip install -r scripts/requirements-ref.txt
    /work/pyref/bin/python scripts/make_family_fixtures.py
    /work/pyref/bin/python scripts/make_family_fixtures.py --check   # regenerate in a temp dir, compare bytes

Pins (asserted): make_fixtures.PINS (torch 2.15.0, transformers 5.24.0, ...). Seeds are fixed and torch runs on one
CPU thread.

It writes, under `tests/fixtures/`:

* `tiny-gpt2/`          GPT2LMHeadModel: 2 layers, n_embd 32, 4 heads, n_inner 128 (4 x 32), learned positions
                        (n_positions 64), Conv1D weights ([in, out]), LayerNorm with bias, gelu_new, tied head.
* `tiny-gpt-neox/`      GPTNeoXForCausalLM as Pythia builds it: parallel attention and MLP
                        (use_parallel_residual), partial rotary (partial_rotary_factor 0.5: 4 of 8 head dims), fused
                        per-head interleaved `query_key_value`, biases, LayerNorm with bias, exact gelu, untied head.
* `tiny-gpt-neox-seq/`  the same with use_parallel_residual = false (GPT-NeoX's sequential residual).
* `parity_families.json`
                        per model: logits, completion log-prob sums and per-parameter gradient L2 norms and sums of
                        L = sum of the completion log-probs, on make_fixtures' right-padded parity batch (the same
                        schema as `parity.json`, from make_fixtures.parity_for_model); plus `greedy`: for each prompt,
                        the ids `generate(do_sample=False, max_new_tokens=8)` appends (one prompt per call, no padding).

LayerNorm weights and all biases are randomised (make_fixtures._randomise_norms_and_biases) so that a model that
ignored a bias or a norm weight would fail.

This file is our own code; it drives transformers but copies none of its code.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets the offline / single-thread environment before torch loads)

import torch  # noqa: E402

SCRIPT = "scripts/make_family_fixtures.py"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]
GREEDY_PROMPTS = ["The capital of France is", "Question: What color is the sky?\nAnswer:"]
GREEDY_NEW_TOKENS = 8


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, dst / name)


def finish(model, out_dir: Path, tokenizer_dir: Path, seed: int) -> None:
    mf._randomise_norms_and_biases(model, seed)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    model.save_pretrained(str(out_dir), safe_serialization=True)
    copy_tokenizer(tokenizer_dir, out_dir)


def build_gpt2(out_dir: Path, tokenizer_dir: Path, vocab: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=None,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
        dtype="float32",
    )
    set_seed(mf.SEED)
    model = GPT2LMHeadModel(cfg).to(torch.float32)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    finish(model, out_dir, tokenizer_dir, mf.SEED + 3)


def build_gpt_neox(out_dir: Path, tokenizer_dir: Path, vocab: int, parallel: bool) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, set_seed

    cfg = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        rotary_pct=0.5,
        rotary_emb_base=10000,
        max_position_embeddings=64,
        initializer_range=0.3,
        layer_norm_eps=1e-5,
        use_parallel_residual=parallel,
        attention_bias=True,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
        dtype="float32",
    )
    set_seed(mf.SEED)
    model = GPTNeoXForCausalLM(cfg).to(torch.float32)
    assert model.lm_head.weight.data_ptr() != model.gpt_neox.embed_in.weight.data_ptr()
    finish(model, out_dir, tokenizer_dir, mf.SEED + (4 if parallel else 5))


def greedy(model_dir: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    cases = []
    for prompt in GREEDY_PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False, max_new_tokens=GREEDY_NEW_TOKENS,
            )
        cases.append({"prompt": prompt, "prompt_ids": ids, "new_ids": [int(i) for i in out[0, len(ids):]]})
    return cases


def write_all(out: Path) -> None:
    torch.set_num_threads(1)
    tokenizer_dir = out / "tiny-llama"
    vocab = mf.TOKENIZER_VOCAB_SIZE
    models = {
        "tiny-gpt2": lambda d: build_gpt2(d, tokenizer_dir, vocab),
        "tiny-gpt-neox": lambda d: build_gpt_neox(d, tokenizer_dir, vocab, parallel=True),
        "tiny-gpt-neox-seq": lambda d: build_gpt_neox(d, tokenizer_dir, vocab, parallel=False),
    }
    small = {
        "tiny-gpt2": ["transformer.h.0.ln_1.bias", "transformer.h.0.attn.c_attn.bias", "transformer.wpe.weight"],
        "tiny-gpt-neox": ["gpt_neox.layers.0.input_layernorm.bias", "gpt_neox.layers.0.attention.query_key_value.bias"],
        "tiny-gpt-neox-seq": ["gpt_neox.layers.0.post_attention_layernorm.weight"],
    }
    info = mf.generator_info()
    info["script"] = SCRIPT
    result = {"generator": info}
    for name, build in models.items():
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        build(d)
        parity = mf.parity_for_model(d, small[name])
        parity["greedy"] = greedy(d)
        result[name] = parity
    mf.write_json(out / "parity_families.json", result)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="regenerate in a temporary folder and compare bytes")
    args = ap.parse_args()
    out = mf.DEFAULT_OUT
    if not args.check:
        write_all(out)
        print(f"wrote {out}/tiny-gpt2, tiny-gpt-neox, tiny-gpt-neox-seq, parity_families.json")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(out / "tiny-llama", tmp / "tiny-llama")
        write_all(tmp)
        names = ["parity_families.json"] + [
            f"{m}/{f}" for m in ["tiny-gpt2", "tiny-gpt-neox", "tiny-gpt-neox-seq"]
            for f in ["config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES]
        ]
        bad = [n for n in names if not filecmp.cmp(tmp / n, out / n, shallow=False)]
        assert not bad, f"regenerated files differ: {bad}"
        print(f"--check: {len(names)} files byte-identical")


if __name__ == "__main__":
    main()
