#!/usr/bin/env python
"""Generate the Python/TRL reference fixtures used by Prospect's parity tests.

Re-run (from the repository root):

    pip install torch==2.15.0 transformers==5.24.0 trl==1.16.0 tokenizers==0.23.3 \
        safetensors==0.8.0 accelerate==1.15.0 datasets==5.2.0
    /opt/pyref/bin/python scripts/make_fixtures.py

The script asserts that the installed versions match the pins below, then (re)writes everything under
`tests/fixtures/`:

* `tiny-llama/`  tiny random LlamaForCausalLM (tied embeddings, GQA) + byte-level BPE tokenizer
* `tiny-qwen2/`  tiny random Qwen2ForCausalLM (q/k/v biases, untied head), saved sharded, same tokenizer
* `data/`        hand-written TRL "standard" (plain text) JSONL datasets: unpaired / paired / sft
* `parity.json`  forward logits, completion log-prob sums and gradients for a right-padded batch, per model,
                 plus tokenizer round trips
* `trl_kto.json`, `trl_kto_paired.json`, `trl_dpo.json`, `trl_sft.json`
                 3 optimizer steps of TRL's KTOTrainer / DPOTrainer / SFTTrainer on tiny-llama (CPU, float32)

Everything is deterministic: fixed seeds, a single CPU thread, and each TRL run in its own fresh
subprocess. Running the script twice must give byte-identical output (`--check` regenerates into a temporary
directory and compares).

This file is our own code; it drives TRL and transformers but does not copy any of their code.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Keep the libraries off the network and quiet, before they are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PINS = {
    "torch": "2.15.0",
    "transformers": "5.24.0",
    "trl": "1.16.0",
    "tokenizers": "0.23.3",
    "safetensors": "0.8.0",
    "accelerate": "1.15.0",
    "datasets": "5.2.0",
}

SEED = 0
MAX_LENGTH = 32
SCRIPT = "scripts/make_fixtures.py"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS = "<|endoftext|>"
TOKENIZER_VOCAB_SIZE = 400

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def check_versions(pins: dict = PINS, hint: str = "") -> dict:
    """The installed versions, asserted equal to `pins` (`hint` says how to get them)."""
    import accelerate
    import datasets
    import safetensors
    import tokenizers
    import transformers
    import trl

    found = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
    }
    bad = {k: (v, pins[k]) for k, v in found.items() if v != pins[k]}
    assert not bad, f"installed versions do not match the pins (found, wanted): {bad}{hint}"
    return found


def generator_info() -> dict:
    v = check_versions()
    return {
        "script": SCRIPT,
        "torch": v["torch"],
        "transformers": v["transformers"],
        "trl": v["trl"],
        "tokenizers": v["tokenizers"],
        "seed": SEED,
    }


# ----------------------------------------------------------------------------------------------------------------
# Built-in tokenizer training corpus (plain English, written for this script).
# ----------------------------------------------------------------------------------------------------------------
CORPUS = """\
The sky is blue on a clear day, and the grass is green after the rain.
The sun rises in the east and sets in the west. The moon shines at night.
Water boils at one hundred degrees and freezes at zero degrees.
A cat is a small animal that likes to sleep in the sun. A dog likes to play and run.
The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.
Two plus two is four. Three plus four is seven. Ten minus one is nine.
Question: What color is the sky? Answer: The sky is blue.
Question: What is the capital of France? Answer: Paris is the capital of France.
Question: How many legs does a cat have? Answer: A cat has four legs.
Please write a short poem about the sea. The sea is wide and the waves are high.
Tell me a fact about the moon. The moon goes around the earth once a month.
Give me a word that rhymes with cat. Hat rhymes with cat, and so does bat.
Translate hello into French. Bonjour means hello in French.
What is the opposite of hot? The opposite of hot is cold.
Name a fruit that is yellow. A banana is a yellow fruit. An apple can be red or green.
The quick brown fox jumps over the lazy dog. The lazy dog does not move.
I think the answer is wrong. I do not know. Maybe it is right, maybe it is not.
Books are good friends. Reading every day is a good habit for a young mind.
The train leaves at nine in the morning and comes back at five in the evening.
Birds can fly, fish can swim, and people can walk and talk.
She said that the weather would be warm and sunny this week.
He wrote a letter to his friend and sent it by mail.
We went to the market to buy bread, milk, eggs and cheese.
The teacher asked the students to read the first page of the book.
Computers process data very quickly and store it in memory.
Summer is hot, winter is cold, spring is mild and autumn is cool.
"""


# ----------------------------------------------------------------------------------------------------------------
# Hand-written datasets (TRL "standard" plain-text format).
# ----------------------------------------------------------------------------------------------------------------
# Labels in microbatches of 2: TT FF TF TT | FT TF TT FT  -> 10 true / 6 false; step 1 has an all-true, an
# all-false and a mixed microbatch; step 3 (epoch 2) starts over from row 0.
UNPAIRED = [
    {"prompt": "Question: What color is the sky?\nAnswer:", "completion": " The sky is blue.", "label": True},
    {"prompt": "Question: What is two plus two?\nAnswer:", "completion": " Two plus two is four.", "label": True},
    {"prompt": "Question: Where does the sun rise?\nAnswer:", "completion": " In the west.", "label": False},
    {"prompt": "Question: What is the capital of Italy?\nAnswer:", "completion": " Madrid.", "label": False},
    {"prompt": "The capital of France is ", "completion": "the city of Paris.", "label": True},
    {"prompt": "Name a fruit that is yellow.", "completion": " A cat is a fruit.", "label": False},
    {"prompt": "Tell me a fact about the moon.", "completion": " The moon goes around the earth.", "label": True},
    {
        "prompt": "Please write a short poem about the sea.",
        "completion": " The sea is wide and the waves are high, the sun is warm in the summer sky.",
        "label": True,
    },
    {"prompt": "What is the opposite of hot?", "completion": " It is hot.", "label": False},
    {"prompt": "Give me a word that rhymes with cat.", "completion": " Hat rhymes with cat.", "label": True},
    {"prompt": "Translate hello into French.", "completion": " Bonjour.", "label": True},
    {"prompt": "How many legs does a cat have?", "completion": " A cat has ten legs.", "label": False},
    {"prompt": "What do birds do?", "completion": " Birds can fly.", "label": True},
    {"prompt": "When does the train leave?", "completion": " The train leaves at nine.", "label": True},
    {"prompt": "What is ten minus one?", "completion": " Ten minus one is two.", "label": False},
    {"prompt": "What do we buy at the market?", "completion": " Bread, milk and eggs.", "label": True},
]

PAIRED = [
    {
        "prompt": "Question: What color is the grass?\nAnswer:",
        "chosen": " The grass is green.",
        "rejected": " The grass is blue.",
    },
    {"prompt": "What is three plus four?", "chosen": " Seven.", "rejected": " Three plus four is nine."},
    {"prompt": "The capital of Spain is ", "chosen": "the city of Madrid.", "rejected": "Rome."},
    {
        "prompt": "Please write a short poem about the sun.",
        "chosen": " The sun is warm and high, it shines all day in the clear blue sky and sets at night.",
        "rejected": " No.",
    },
    {"prompt": "Where does the sun set?", "chosen": " In the west.", "rejected": " In the east, I think."},
    {"prompt": "What does a dog like?", "chosen": " A dog likes to play and run.", "rejected": " Fish."},
    {"prompt": "Is water cold at zero degrees?", "chosen": " Yes, it freezes.", "rejected": " It boils."},
    {"prompt": "Name a season.", "chosen": " Spring is mild.", "rejected": " Bread and cheese."},
]

SFT = [
    {"prompt": "Question: What color is the sky?\nAnswer:", "completion": " The sky is blue."},
    {"prompt": "What is two plus two?", "completion": " Two plus two is four."},
    {"prompt": "The capital of Italy is ", "completion": "the city of Rome."},
    {"prompt": "Tell me a fact about the moon.", "completion": " The moon shines at night."},
    {
        "prompt": "Please write a short poem about the rain.",
        "completion": " The rain is cold and the grass is green, the birds fly over the quiet stream.",
    },
    {"prompt": "Translate hello into French.", "completion": " Bonjour means hello."},
    {"prompt": "What do fish do?", "completion": " Fish can swim."},
    {"prompt": "What is the opposite of cold?", "completion": " The opposite of cold is hot."},
    {"prompt": "Name a yellow fruit.", "completion": " A banana."},
    {"prompt": "What did he write?", "completion": " He wrote a letter to his friend."},
]

TOKENIZER_TEXTS = [
    "The sky is blue.",
    "Question: What is 2+2?\nAnswer: 4",
    "Numbers 0123456789 and 3.14159, 42, 1000000.",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>",
    "A sentence that ends with the end-of-text token.<|endoftext|>",
    "  leading spaces, tabs\tand\nnew lines  ",
    "Unicode: café, naïve, 東京, emoji 🙂",
    "",
]


# ----------------------------------------------------------------------------------------------------------------
# JSON output: dicts indented, flat lists of scalars on one line, float32 values as their shortest repr.
# ----------------------------------------------------------------------------------------------------------------
class F32(str):
    """A float32 value, already formatted as the shortest decimal string that round-trips to it."""


def f32(x) -> F32:
    v = np.float32(x)
    assert np.isfinite(v), f"non-finite float32 {v}"
    s = str(v)
    if s == "-0.0":
        s = "0.0"
    return F32(s)


def f32_list(t) -> list:
    a = np.asarray(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t, dtype=np.float32)
    if a.ndim == 0:
        return f32(a)
    return [f32_list(x) if a.ndim > 1 else f32(x) for x in a]


def _scalar(v) -> str:
    if isinstance(v, F32):
        return str(v)
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        assert math.isfinite(v), f"non-finite float {v}"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    raise TypeError(f"cannot serialise {type(v)}")


def _is_scalar(v) -> bool:
    return isinstance(v, (F32, bool, int, float, str)) or v is None


def dumps(obj, indent: int = 0) -> str:
    pad = " " * indent
    if _is_scalar(obj):
        return _scalar(obj)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f'{pad}  {json.dumps(str(k), ensure_ascii=False)}: {dumps(v, indent + 2)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if not obj:
            return "[]"
        if all(_is_scalar(x) for x in obj):
            return "[" + ",".join(_scalar(x) for x in obj) + "]"
        if all(isinstance(x, (list, tuple)) and all(_is_scalar(y) for y in x) for x in obj):
            return "[\n" + ",\n".join(pad + "  " + dumps(x) for x in obj) + "\n" + pad + "]"
        return "[\n" + ",\n".join(pad + "  " + dumps(x, indent + 2) for x in obj) + "\n" + pad + "]"
    raise TypeError(f"cannot serialise {type(obj)}")


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(obj) + "\n"
    json.loads(text)  # sanity: valid JSON
    path.write_text(text, encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and models
# ----------------------------------------------------------------------------------------------------------------
def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Train on the corpus plus the dataset texts, one line per "document".
    lines = CORPUS.splitlines()
    for row in UNPAIRED + PAIRED + SFT:
        lines.extend(v for v in row.values() if isinstance(v, str))
    tok.train_from_iterator(lines, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def save_tokenizer(tok, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "padding_side": "right",
        "chat_template": CHATML_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    # Check that transformers loads it as a fast tokenizer with the expected specials.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out_dir))
    assert hf.is_fast, type(hf)
    assert isinstance(hf, PreTrainedTokenizerFast) or hf.__class__.__name__ == "TokenizersBackend", type(hf)
    assert hf.eos_token == EOS and hf.pad_token == EOS and hf.bos_token is None
    assert hf.eos_token_id == 0 and hf.pad_token_id == 0
    assert len(hf) == tok.get_vocab_size(), (len(hf), tok.get_vocab_size())
    assert hf("The sky")["input_ids"] == tok.encode("The sky").ids


def model_common(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        initializer_range=0.3,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
        attention_dropout=0.0,
        dtype="float32",
    )


def _randomise_norms_and_biases(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build_llama(out_dir: Path, tok) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    cfg = LlamaConfig(**model_common(tok.get_vocab_size()), tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
    set_seed(SEED)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    _randomise_norms_and_biases(model, SEED + 1)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(tok, out_dir)


def build_qwen2(out_dir: Path, tok) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM, set_seed

    common = model_common(tok.get_vocab_size())
    common.pop("head_dim")  # Qwen2 derives head_dim = hidden_size / num_attention_heads = 8
    cfg = Qwen2Config(**common, tie_word_embeddings=False, use_sliding_window=False)
    set_seed(SEED)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    _randomise_norms_and_biases(model, SEED + 2)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    model.save_pretrained(str(out_dir), safe_serialization=True, max_shard_size="80KB")
    save_tokenizer(tok, out_dir)
    shards = sorted(p.name for p in out_dir.glob("model-*.safetensors"))
    assert (out_dir / "model.safetensors.index.json").exists() and 2 <= len(shards) <= 3, shards


# ----------------------------------------------------------------------------------------------------------------
# parity.json
# ----------------------------------------------------------------------------------------------------------------
PARITY_ROWS = [
    ("Question: What color is the sky?\nAnswer:", " The sky is blue." + EOS),
    ("Name a fruit.", " A banana is a yellow fruit." + EOS),
    ("Two plus two is", " four."),
]


def parity_batch(tokenizer):
    seqs, cmask = [], []
    for prompt, completion in PARITY_ROWS:
        p = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + completion)["input_ids"]
        assert full[: len(p)] == p
        seqs.append(full)
        cmask.append([0] * len(p) + [1] * (len(full) - len(p)))
    lengths = [len(s) for s in seqs]
    assert len(set(lengths)) == len(lengths), lengths
    t = max(lengths)
    pad = tokenizer.pad_token_id
    input_ids = [s + [pad] * (t - len(s)) for s in seqs]
    attention_mask = [[1] * len(s) + [0] * (t - len(s)) for s in seqs]
    completion_mask = [m + [0] * (t - len(m)) for m in cmask]
    return input_ids, attention_mask, completion_mask


def parity_for_model(model_dir: Path, small_params: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    input_ids, attention_mask, completion_mask = parity_batch(tokenizer)
    ids = torch.tensor(input_ids)
    am = torch.tensor(attention_mask)
    cm = torch.tensor(completion_mask)

    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    assert logits.dtype == torch.float32
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok_logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = cm[:, 1:].to(tok_logp.dtype)
    logps_sum = (tok_logp * mask).sum(-1)
    loss = logps_sum.sum()
    loss.backward()

    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().double()
        grads[name] = {"shape": list(p.shape), "l2_norm": g.norm().item(), "sum": g.sum().item()}
    full = {}
    for name in small_params:
        p = dict(model.named_parameters())[name]
        full[name] = {"shape": list(p.shape), "values": f32_list(p.grad.reshape(-1))}

    # Also record the logits of the eager attention implementation as a sanity check of the sdpa ones.
    eager = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    eager.eval()
    with torch.no_grad():
        eager_logits = eager(input_ids=ids, attention_mask=am, use_cache=False).logits
    valid = am.bool()
    max_diff = (eager_logits - logits.detach())[valid].abs().max().item()
    assert max_diff < 1e-4, max_diff

    return {
        "model_dir": f"tests/fixtures/{model_dir.name}",
        "attn_implementation": model.config._attn_implementation,
        "tie_word_embeddings": bool(model.config.tie_word_embeddings),
        "texts": [{"prompt": p, "completion": c} for p, c in PARITY_ROWS],
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "logits_shape": list(logits.shape),
        "logits_note": "model(input_ids, attention_mask) in eval mode; position_ids default to arange(t). Rows at "
        "padded positions (attention_mask == 0) are included but are implementation-defined; compare only where "
        "attention_mask == 1.",
        "logits": f32_list(logits),
        "logps_sum": f32_list(logps_sum),
        "token_count": [int(x) for x in cm[:, 1:].sum(-1)],
        "loss_definition": "L = sum_b logps_sum[b]; logps_sum[b] = sum_{i>=1} completion_mask[b,i] * "
        "log_softmax(logits[b,i-1])[input_ids[b,i]]",
        "loss": f32(loss.item()),
        "grads": grads,
        "grads_full": full,
        "eager_vs_sdpa_max_abs_logit_diff": f32(max_diff),
    }


def make_parity(out: Path) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tiny-llama"))
    result = {"generator": generator_info()}
    result["tiny-llama"] = parity_for_model(
        out / "tiny-llama",
        ["model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.k_proj.weight"],
    )
    result["tiny-qwen2"] = parity_for_model(
        out / "tiny-qwen2",
        [
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.k_proj.bias",
        ],
    )
    result["tokenizer"] = {
        "call": "tokenizer(text)['input_ids'] (add_special_tokens=True, which adds nothing for this tokenizer)",
        "vocab_size": len(tokenizer),
        "special_tokens": {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS},
        "cases": [
            {"text": t, "input_ids": tokenizer(t)["input_ids"], "decoded": tokenizer.decode(tokenizer(t)["input_ids"])}
            for t in TOKENIZER_TEXTS
        ],
    }
    write_json(out / "parity.json", result)


# ----------------------------------------------------------------------------------------------------------------
# TRL trajectories (each in its own subprocess)
# ----------------------------------------------------------------------------------------------------------------
COMMON_ARGS = dict(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=4,
    learning_rate=1e-2,
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.0,
    max_grad_norm=1.0,
    max_steps=3,
    train_sampling_strategy="sequential",
    max_length=MAX_LENGTH,
    use_cpu=True,
    bf16=False,
    fp16=False,
    report_to="none",
    logging_steps=1,
    save_strategy="no",
    seed=SEED,
    dataloader_num_workers=0,
    disable_tqdm=True,
)

RUNS = {
    "kto": dict(trainer="KTOTrainer", data="unpaired.jsonl", extra=dict(beta=0.1, desirable_weight=1.0,
                                                                       undesirable_weight=1.0, loss_type="kto")),
    "kto_paired": dict(trainer="KTOTrainer", data="paired.jsonl", extra=dict(beta=0.1, desirable_weight=1.0,
                                                                            undesirable_weight=1.0, loss_type="kto")),
    "dpo": dict(trainer="DPOTrainer", data="paired.jsonl", extra=dict(beta=0.1, loss_type=["sigmoid"])),
    "sft": dict(trainer="SFTTrainer", data="sft.jsonl", extra=dict(completion_only_loss=True)),
}

RESOLVED_KEYS = [
    "optim", "adam_beta1", "adam_beta2", "adam_epsilon", "gradient_checkpointing", "dataloader_drop_last",
    "average_tokens_across_devices", "pad_to_multiple_of", "truncation_mode", "disable_dropout",
    "precompute_ref_log_probs", "padding_free", "packing", "shuffle_dataset", "dataset_text_field",
    "logging_nan_inf_filter", "remove_unused_columns",
]


def _trim(ids: list[int], mask: list[int]) -> list[int]:
    return [i for i, m in zip(ids, mask) if m]


def run_trl(kind: str, out: Path, result_path: Path) -> None:
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    set_seed(SEED)
    spec = RUNS[kind]
    model_name = spec.get("model", "tiny-llama")  # a folder under tests/fixtures/
    model_dir = out / model_name
    data_path = out / "data" / spec["data"]
    raw_rows = read_jsonl(data_path)
    dataset = Dataset.from_list(raw_rows)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    trainer_cls = getattr(trl, spec["trainer"])
    config_cls = getattr(trl, spec["trainer"].replace("Trainer", "Config"))
    captured = []

    class Recording(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            metrics = self._metrics["train"]
            before = {k: len(v) for k, v in metrics.items()}
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
            rec = {"inputs": {k: v.tolist() for k, v in inputs.items() if isinstance(v, torch.Tensor)},
                   "loss": (loss[0] if return_outputs else loss).item(), "metrics": {}}
            if num_items_in_batch is not None:
                rec["num_items_in_batch"] = int(num_items_in_batch)
            for k, v in metrics.items():
                if len(v) > before.get(k, 0) or k == "num_tokens":
                    rec["metrics"][k] = v[-1]
            captured.append(rec)
            return loss

    with tempfile.TemporaryDirectory() as tmp:
        args = config_cls(output_dir=tmp, **COMMON_ARGS, **spec["extra"])
        trainer = Recording(model=str(model_dir), args=args, train_dataset=dataset, processing_class=tokenizer)
        train_ds = trainer.train_dataset
        rows = [dict(r) for r in train_ds]
        train_out = trainer.train()
        resolved = {k: getattr(args, k) for k in RESOLVED_KEYS if hasattr(args, k)}
        opt = trainer.optimizer
        opt_groups = [
            {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, str, type(None), tuple))}
            | {"num_params": len(g["params"])}
            for g in opt.param_groups
        ]
        resolved["optimizer_class"] = type(getattr(opt, "optimizer", opt)).__name__
        named = dict(trainer.model.named_parameters())
        ids_to_name = {id(p): n for n, p in named.items()}
        decay = set(trainer.get_decay_parameter_names(trainer.model))
        resolved["no_decay_params"] = sorted(n for n in named if n not in decay)
        for g, og in zip(opt_groups, getattr(opt, "optimizer", opt).param_groups):
            g["param_names"] = sorted(ids_to_name[id(p)] for p in og["params"])
        final_params = {
            n: {"shape": list(p.shape), "sum": p.detach().double().sum().item(),
                "l2_norm": p.detach().double().norm().item()}
            for n, p in trainer.model.named_parameters()
        }

    # ---- Rows in the order TRL stores them, and the schedule TRL actually fed (matched from compute_loss inputs).
    ml = MAX_LENGTH
    if spec["trainer"] == "KTOTrainer":
        keys = ["prompt_ids", "completion_ids", "KL_completion_ids", "label"]
        table_rows = [{k: r[k] for k in keys} for r in rows]

        def row_key(r):
            return (tuple((r["prompt_ids"] + r["completion_ids"])[:ml]),
                    tuple((r["prompt_ids"] + r["KL_completion_ids"])[:ml]), bool(r["label"]))

        def batch_keys(inp):
            return [(tuple(_trim(a, m)), tuple(_trim(b, n)), bool(l)) for a, m, b, n, l in zip(
                inp["input_ids"], inp["attention_mask"], inp["KL_input_ids"], inp["KL_attention_mask"], inp["label"])]
    elif spec["trainer"] == "DPOTrainer":
        keys = ["prompt_ids", "chosen_ids", "rejected_ids"]
        table_rows = [{k: r[k] for k in keys} for r in rows]

        def row_key(r):
            return (tuple((r["prompt_ids"] + r["chosen_ids"])[:ml]), tuple((r["prompt_ids"] + r["rejected_ids"])[:ml]))

        def batch_keys(inp):
            seqs = [tuple(_trim(a, m)) for a, m in zip(inp["input_ids"], inp["attention_mask"])]
            half = len(seqs) // 2
            return list(zip(seqs[:half], seqs[half:]))
    else:
        table_rows = []
        for r in rows:
            labels = r["labels"]
            table_rows.append({"input_ids": r["input_ids"], "labels": labels,
                               "completion_mask": [int(x != -100) for x in labels]})

        def row_key(r):
            return tuple(r["input_ids"]), tuple(r["labels"])

        def batch_keys(inp):
            return [(tuple(_trim(a, m)), tuple(_trim(lab, m))) for a, lab, m in zip(
                inp["input_ids"], inp["labels"], inp["attention_mask"])]

    index = {}
    for i, r in enumerate(rows):
        k = row_key(r)
        assert k not in index, f"duplicate row {i}"
        index[k] = i
    fed = [[index[k] for k in batch_keys(c["inputs"])] for c in captured]

    # Group microbatches into optimizer steps exactly as the loop did: steps_in_epoch microbatches per epoch, GA per
    # step, a shorter last step when the epoch does not divide evenly.
    ga = COMMON_ARGS["gradient_accumulation_steps"]
    bs = COMMON_ARGS["per_device_train_batch_size"]
    n_mb = math.ceil(len(rows) / bs)
    steps_per_epoch = math.ceil(n_mb / ga)
    sizes = [min(ga, n_mb - s * ga) for s in range(steps_per_epoch)]
    step_sizes = []
    while len(step_sizes) < COMMON_ARGS["max_steps"]:
        step_sizes.extend(sizes)
    step_sizes = step_sizes[: COMMON_ARGS["max_steps"]]
    assert sum(step_sizes) == len(captured), (step_sizes, len(captured))

    log_steps = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    summary = [e for e in trainer.state.log_history if "train_runtime" in e]
    assert len(log_steps) == COMMON_ARGS["max_steps"]
    steps, pos = [], 0
    for s, n in enumerate(step_sizes):
        mbs = captured[pos:pos + n]
        entry = {
            "step": s + 1,
            "log": {k: v for k, v in log_steps[s].items()},
            "microbatches": [],
        }
        for j, c in enumerate(mbs):
            mb = {"rows": fed[pos + j], "loss": c["loss"], "metrics": c["metrics"]}
            if "num_items_in_batch" in c:
                mb["num_items_in_batch"] = c["num_items_in_batch"]
            entry["microbatches"].append(mb)
        steps.append(entry)
        pos += n

    config = {"trainer": spec["trainer"], "config_class": config_cls.__name__, "model": f"tests/fixtures/{model_name}",
              "dataset": f"tests/fixtures/data/{spec['data']}", **COMMON_ARGS, **spec["extra"]}
    config["output_dir"] = "<tmp>"
    result = {
        "generator": generator_info(),
        "config": config,
        "resolved_defaults": resolved,
        "optimizer_param_groups": opt_groups,
        "num_rows_in": len(raw_rows),
        "num_rows_after_preprocessing": len(rows),
        "rows": table_rows,
        "steps": steps,
        "train_loss": summary[0]["train_loss"] if summary else None,
        "global_step": train_out.global_step,
        "final_params": final_params,
    }
    # Source text of every row in TRL's order (before TRL appends EOS), checked against TRL's token ids.
    if kind == "kto_paired":
        rows_text = _unpair_for_record(raw_rows)
    else:
        rows_text = [dict(r) for r in raw_rows]
    assert len(rows_text) == len(rows), "no row may be dropped by TRL's filters in these fixtures"
    _check_rows_against_text(spec["trainer"], tokenizer, rows, rows_text)
    result["rows_text"] = rows_text
    result_path.write_text(json.dumps(result, default=_json_default))


def _unpair_for_record(rows):
    # TRL's unpair_preference_dataset is a batched datasets.map (default batch_size 1000 > 8 rows), so every chosen
    # row comes first, then every rejected row. _check_rows_against_text verifies this against TRL's token ids.
    out = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows]
    out += [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows]
    return out


def _check_rows_against_text(trainer: str, tokenizer, rows, rows_text) -> None:
    dec = tokenizer.decode
    for r, t in zip(rows, rows_text):
        if trainer == "KTOTrainer":
            assert dec(r["prompt_ids"] + r["completion_ids"]) == t["prompt"] + t["completion"] + EOS, (r, t)
            assert t["prompt"].startswith(dec(r["prompt_ids"])) and bool(r["label"]) == t["label"], (r, t)
        elif trainer == "DPOTrainer":
            assert dec(r["prompt_ids"] + r["chosen_ids"]) == t["prompt"] + t["chosen"] + EOS, (r, t)
            assert dec(r["prompt_ids"] + r["rejected_ids"]) == t["prompt"] + t["rejected"] + EOS, (r, t)
        else:
            full = t["prompt"] + t["completion"] + EOS
            text = dec(r["input_ids"])
            assert text == full or (len(r["input_ids"]) == MAX_LENGTH and full.startswith(text)), (r, t)


def _json_default(o):
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))


def make_trl(out: Path, kind: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / f"{kind}.json"
        env = dict(os.environ)
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--trl-worker", kind,
             "--result", str(res)],
            check=True, env=env,
        )
        result = json.loads(res.read_text())
    result["generator"] = generator_info()
    write_json(out / f"trl_{kind}.json", result)


README = """\
# Reference fixtures (generated -- do not edit by hand)

Regenerate with `/opt/pyref/bin/python scripts/make_fixtures.py` (pins: torch 2.15.0, transformers 5.24.0,
trl 1.16.0, tokenizers 0.23.3); `--check` regenerates into a temp dir and verifies the files are byte-identical.
`scripts/check_trl_semantics.py` re-derives the trl_*.json trajectories without TRL.

* `tiny-llama/`: random LlamaForCausalLM (vocab 400, hidden 32, 2 layers, 4 heads / 2 kv heads, head_dim 8,
  intermediate 64, tied embeddings, rope_theta 10000 under `rope_parameters`), float32 safetensors, plus a byte-level
  BPE tokenizer (`<|endoftext|>`=0 is eos and pad, `<|im_start|>`=1, `<|im_end|>`=2, no BOS, ChatML template).
* `tiny-qwen2/`: random Qwen2ForCausalLM (q/k/v biases, untied lm_head), sharded safetensors + index, same tokenizer.
* `data/`: `unpaired.jsonl` (16 rows, 10 true / 6 false), `paired.jsonl` (8 rows), `sft.jsonl` (10 rows).
* `parity.json`: per model, logits / completion log-prob sums / gradient norms+sums for a right-padded batch of 3;
  tokenizer cases.
* `trl_kto.json`, `trl_kto_paired.json`, `trl_dpo.json`, `trl_sft.json`: TRL config, the tokenized rows in TRL's
  order, for each of 3 optimizer steps the log entry and the microbatches (row indices, loss, metrics), and the
  sum / L2 norm of every parameter after the 3 steps. max_length = 32 for all runs.
"""


# ----------------------------------------------------------------------------------------------------------------
def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("tiny-llama", "tiny-qwen2", "data"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    tok = build_tokenizer()
    build_llama(out / "tiny-llama", tok)
    build_qwen2(out / "tiny-qwen2", tok)
    write_jsonl(out / "data" / "unpaired.jsonl", UNPAIRED)
    write_jsonl(out / "data" / "paired.jsonl", PAIRED)
    write_jsonl(out / "data" / "sft.jsonl", SFT)
    (out / "README.md").write_text(README, encoding="utf-8")
    make_parity(out)
    for kind in RUNS:
        make_trl(out, kind)


def compare_trees(a: Path, b: Path) -> list[str]:
    diffs = []
    for p in sorted(a.rglob("*")):
        if p.is_file():
            q = b / p.relative_to(a)
            if not q.exists() or not filecmp.cmp(p, q, shallow=False):
                diffs.append(str(p.relative_to(a)))
    for q in sorted(b.rglob("*")):
        if q.is_file() and not (a / q.relative_to(b)).exists():
            diffs.append(str(q.relative_to(b)))
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary directory and compare byte-for-byte with --out")
    ap.add_argument("--trl-worker", choices=sorted(RUNS), help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    check_versions()
    if args.trl_worker:
        run_trl(args.trl_worker, args.out, args.result)
        return
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            diffs = compare_trees(args.out, Path(tmp))
        if diffs:
            print("DIFFERENT:", *diffs, sep="\n  ")
            sys.exit(1)
        print("fixtures are byte-identical")
        return
    generate(args.out)


if __name__ == "__main__":
    main()
