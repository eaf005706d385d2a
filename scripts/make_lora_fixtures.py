#!/usr/bin/env python
"""Reference fixtures for LoRA (PEFT) training: an adapter for tiny-llama and TRL 1.16 trajectories that train it.

Run from the repository root, after `scripts/make_fixtures.py` has written `tests/fixtures/tiny-llama/` and
`tests/fixtures/data/`:

    pip install -r scripts/requirements-ref.txt      # adds peft==0.21.2 to make_fixtures' pins
    /work/pyref/bin/python scripts/make_lora_fixtures.py
    /work/pyref/bin/python scripts/make_lora_fixtures.py --check   # regenerate in a temp dir, compare bytes

Pins (asserted): torch 2.15.0, transformers 5.24.0, trl 1.16.0, tokenizers 0.23.3, safetensors 0.8.0,
accelerate 1.15.0, datasets 5.2.0 (make_fixtures.PINS) and peft 0.21.2. Seeds are fixed, torch runs on one CPU
thread, and each TRL run is a fresh subprocess that reuses `make_fixtures.run_trl` unchanged.

It writes, under `tests/fixtures/`:

* `tiny-llama-lora/`    a PEFT LoRA adapter for `tiny-llama/` (r=4, lora_alpha=8, dropout 0, bias "none", targets
                        q/k/v/o/gate/up/down_proj, CAUSAL_LM) whose lora_A and lora_B are BOTH seeded
                        N(0, 0.05^2) values, so the adapted policy differs from the base from the first token on
                        (max |logit change| ~1.9, mean |token log-prob change| ~0.25 on a probe sequence).
                        `adapter_config.json` names the base neutrally as "tiny-llama" (pass the base path
                        separately); PEFT's generated README.md model card is not kept.
* `trl_kto_lora.json`   TRL 1.16 KTOTrainer, 3 steps, from `PeftModel.from_pretrained(tiny-llama, tiny-llama-lora,
                        is_trainable=True)`; data, tokenization, microbatch 2 x accumulation 4, lr 1e-2 constant,
                        max_grad_norm 1, beta 0.1, seed 0 and sequential order exactly as make_fixtures' "kto" run.
* `trl_dpo_lora.json`   the same for DPOTrainer and make_fixtures' "dpo" run.
* `trl_lora_fresh.json` one step of each ("kto", "dpo") from a FRESH adapter (PEFT's default init: A kaiming-uniform,
                        B = 0; r=4, alpha=8, dropout 0, q/k/v/o_proj) created by TRL from `peft_config`, plus the
                        initial and final adapter tensors.

The trajectory files have the schema of `trl_kto.json` / `trl_dpo.json` (config, rows, per-step log and microbatches,
final_params sum/L2 of every parameter of the PeftModel) plus `reference` (how TRL built the reference model),
`peft` (trainable / frozen adapter bookkeeping) and `adapter_initial` / `adapter_final`: every adapter tensor under
the name PEFT writes into adapter_model.safetensors, as {"shape", "values" (flattened float32)}.

Reference model: given a PeftModel and no `ref_model`, TRL 1.16 (kto_trainer.py / dpo_trainer.py, the
`elif is_peft_model(model) and ref_model is None` branch of __init__) calls `model.add_adapter("ref",
model.peft_config["default"])` and copies every `.default.` tensor into `.ref.`; the reference forward runs under
`use_adapter(model, "ref")`. So the reference is a frozen copy of the initial adapter on the same base, not the bare
base; at step 1 policy == reference. With `peft_config` (the fresh runs) TRL wraps the model itself, adds no "ref"
adapter, and the reference forward runs with the adapter disabled (the bare base, equal to the policy at B = 0).

This file is our own code; it drives TRL, PEFT and transformers but copies none of their code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets the offline / single-thread environment before torch loads)

import torch  # noqa: E402

SCRIPT = "scripts/make_lora_fixtures.py"
OUT = mf.DEFAULT_OUT
SEED = 0
ADAPTER_SEED = SEED + 20
ADAPTER_STD = 0.05
PEFT_PIN = "0.21.2"
ADAPTER_DIR = "tiny-llama-lora"
BASE_NAME = "tiny-llama"  # base_model_name_or_path written into adapter_config.json

ADAPTER_LORA = dict(
    r=4, lora_alpha=8, lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    bias="none", task_type="CAUSAL_LM",
)
FRESH_LORA = dict(
    r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    bias="none", task_type="CAUSAL_LM",
)

# Each run reuses one of make_fixtures.RUNS (trainer, data file, loss arguments) unchanged.
LORA_RUNS = {
    "kto_lora": dict(base_run="kto", fresh=False, max_steps=3),
    "dpo_lora": dict(base_run="dpo", fresh=False, max_steps=3),
    "kto_lora_fresh": dict(base_run="kto", fresh=True, max_steps=1),
    "dpo_lora_fresh": dict(base_run="dpo", fresh=True, max_steps=1),
}

REFERENCE_TRAINED = (
    "TRL 1.16 was given the PeftModel (adapter 'default', trainable) and no ref_model/peft_config. Its __init__ "
    "then calls model.add_adapter('ref', model.peft_config['default']) and copies every '.default.' tensor into "
    "'.ref.'; reference log-probs are computed under trl.trainer.utils.use_adapter(model, 'ref'). So the reference "
    "is a frozen copy of the INITIAL adapter (tiny-llama-lora) on the same base -- not the bare base -- and at step 1 "
    "policy == reference (KTO loss 0.5, DPO loss ln 2, rewards 0). The 'ref' adapter is frozen (requires_grad False, "
    "not in the optimizer) and is checked bit-equal to the initial adapter after training (peft.ref_equals_initial)."
)
REFERENCE_FRESH = (
    "TRL 1.16 was given the model path plus peft_config (a fresh LoRA: A kaiming_uniform(a=sqrt(5)) under "
    "set_seed(0) inside TRL, B = 0). TRL wraps the model with get_peft_model and adds no 'ref' adapter; reference "
    "log-probs are computed under use_adapter(model, None), i.e. model.disable_adapter(): the bare base, which equals "
    "the policy at step 1 because B = 0. grad_norm is over the trainable adapter tensors only; at step 1 only lora_B "
    "has a non-zero gradient (dL/dA = 0 while B = 0)."
)


def check_versions() -> dict:
    import peft

    found = mf.check_versions()
    found["peft"] = peft.__version__
    assert found["peft"] == PEFT_PIN, f"peft {found['peft']} installed, wanted {PEFT_PIN}"
    return found


def generator_info() -> dict:
    info = mf.generator_info()
    info["script"] = SCRIPT
    info["peft"] = check_versions()["peft"]
    return info


# ----------------------------------------------------------------------------------------------------------------
# The adapter folder
# ----------------------------------------------------------------------------------------------------------------
def _write_adapter_config(path: Path) -> None:
    """Neutral base name and a sorted target_modules (PEFT stores a set, whose order depends on the string hash)."""
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = BASE_NAME
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))  # PEFT's own format (no trailing newline)


def build_adapter(out: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, set_seed

    torch.set_num_threads(1)
    dest = out / ADAPTER_DIR
    if dest.exists():
        shutil.rmtree(dest)
    set_seed(SEED)
    base = AutoModelForCausalLM.from_pretrained(str(out / "tiny-llama"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(**ADAPTER_LORA))
    g = torch.Generator().manual_seed(ADAPTER_SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():  # model order: deterministic
            if "lora_A" in name or "lora_B" in name:
                p.copy_(ADAPTER_STD * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(dest))  # the neutral base name goes in afterwards (_write_adapter_config)
    readme = dest / "README.md"
    if readme.exists():
        readme.unlink()
    _write_adapter_config(dest / "adapter_config.json")
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    # The saved names/values are what PEFT's state dict says, and PeftModel.from_pretrained loads them back.
    want = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    saved = load_file(str(dest / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(want) and all(torch.equal(saved[k], want[k]) for k in want)
    model.eval()
    fresh_base = AutoModelForCausalLM.from_pretrained(str(out / "tiny-llama"), dtype=torch.float32).eval()
    ids = torch.tensor([[330, 28, 355, 319, 298, 263, 264, 325, 33]])
    with torch.no_grad():
        base_logits = fresh_base(input_ids=ids).logits
        ours = model(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(fresh_base, str(dest)).eval()
    assert loaded.peft_config["default"].base_model_name_or_path == BASE_NAME
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()
    diff = (theirs - base_logits).abs().max().item()
    assert 0.05 < diff < 5.0, f"adapter changes the logits by {diff}: not clearly different / not well-behaved"


# ----------------------------------------------------------------------------------------------------------------
# TRL runs: make_fixtures.run_trl with the model swapped for a PeftModel (in a subprocess)
# ----------------------------------------------------------------------------------------------------------------
def _adapter_tensors(model, adapter_name: str) -> dict:
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    return {k: {"shape": list(v.shape), "values": [float(x) for x in v.detach().float().reshape(-1).tolist()]}
            for k, v in sd.items()}


def run_worker(kind: str, out: Path, result_path: Path) -> None:
    import trl
    from peft import LoraConfig, PeftModel
    from trl.trainer.utils import create_model_from_path

    spec = LORA_RUNS[kind]
    base_spec = mf.RUNS[spec["base_run"]]
    mf.RUNS[kind] = base_spec  # same trainer, data file and loss arguments as the full fine-tuning run
    if spec["max_steps"] != mf.COMMON_ARGS["max_steps"]:
        mf.COMMON_ARGS = dict(mf.COMMON_ARGS, max_steps=spec["max_steps"])  # run_trl reads it at call time
    adapter_dir = out / ADAPTER_DIR
    holder = {}
    original = getattr(trl, base_spec["trainer"])

    class LoraTrainer(original):
        def __init__(self, model, args, **kwargs):
            assert isinstance(model, str)
            if spec["fresh"]:
                kwargs["peft_config"] = LoraConfig(**FRESH_LORA)
            else:
                base = create_model_from_path(model)  # what TRL does with a model path (float32)
                model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
            super().__init__(model=model, args=args, **kwargs)
            holder["trainer"] = self
            holder["initial"] = _adapter_tensors(self.model, "default")
            holder["has_ref"] = "ref" in self.model.peft_config
            if holder["has_ref"]:
                holder["ref_initial"] = _adapter_tensors(self.model, "ref")

    setattr(trl, base_spec["trainer"], LoraTrainer)  # run_trl subclasses getattr(trl, trainer) for its recording
    mf.run_trl(kind, out, result_path)

    trainer = holder["trainer"]
    model = trainer.model
    result = json.loads(result_path.read_text())
    final = _adapter_tensors(model, "default")
    named = dict(model.named_parameters())
    trainable = sorted(n for n, p in named.items() if p.requires_grad)
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    ids_to_name = {id(p): n for n, p in named.items()}
    peft_info = {
        "adapters": sorted(model.peft_config),
        "active_adapter": model.active_adapter,
        "trainable_params": trainable,
        "optimizer_params": sorted(ids_to_name[i] for i in in_opt),
        "num_trainable_elements": sum(named[n].numel() for n in trainable),
    }
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable), trainable
    assert peft_info["optimizer_params"] == trainable
    if spec["fresh"]:
        assert not holder["has_ref"], "a fresh peft_config run must not get a 'ref' adapter"
        assert all(v["values"] == [0.0] * len(v["values"]) for k, v in holder["initial"].items() if "lora_B" in k)
    else:
        assert holder["has_ref"], "TRL 1.16 should have added a 'ref' adapter"
        assert holder["ref_initial"] == holder["initial"]
        ref_final = _adapter_tensors(model, "ref")
        peft_info["ref_equals_initial"] = ref_final == holder["initial"]
        assert peft_info["ref_equals_initial"], "the 'ref' adapter moved during training"
        assert not any(named[n].requires_grad for n in named if ".ref." in n)
        # The initial adapter in the JSON is exactly the checked-in folder.
        from safetensors.torch import load_file

        saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
        assert sorted(saved) == sorted(holder["initial"])
        for k, v in saved.items():
            assert [float(x) for x in v.reshape(-1).tolist()] == holder["initial"][k]["values"], k
    assert final != holder["initial"]
    result["peft"] = peft_info
    result["adapter_initial"] = holder["initial"]
    result["adapter_final"] = final
    result_path.write_text(json.dumps(result))


def _f32_tensors(tensors: dict) -> dict:
    return {k: {"shape": v["shape"], "values": [mf.f32(x) for x in v["values"]]} for k, v in tensors.items()}


def trl_result(out: Path, kind: str) -> dict:
    spec = LORA_RUNS[kind]
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / f"{kind}.json"
        env = dict(os.environ, PYTHONHASHSEED="0")
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--trl-worker", kind,
             "--result", str(res)],
            check=True, env=env,
        )
        result = json.loads(res.read_text())
    result["generator"] = generator_info()
    cfg = result["config"]
    if spec["fresh"]:
        cfg["peft_config"] = dict(FRESH_LORA, init_lora_weights=True, use_rslora=False)
        cfg["peft_model"] = "TRL wraps tests/fixtures/tiny-llama with get_peft_model(model, peft_config)"
        reference = REFERENCE_FRESH
    else:
        cfg["adapter"] = f"tests/fixtures/{ADAPTER_DIR}"
        cfg["peft_model"] = (f"PeftModel.from_pretrained(<tiny-llama>, 'tests/fixtures/{ADAPTER_DIR}', "
                             "is_trainable=True)")
        reference = REFERENCE_TRAINED
    out_obj = {"generator": result.pop("generator"), "reference": reference}
    out_obj.update(result)
    out_obj["adapter_initial"] = _f32_tensors(result["adapter_initial"])
    out_obj["adapter_final"] = _f32_tensors(result["adapter_final"])
    return out_obj


def generate(out: Path) -> None:
    assert (out / "tiny-llama" / "model.safetensors").exists(), "run scripts/make_fixtures.py first"
    build_adapter(out)
    for kind in ("kto_lora", "dpo_lora"):
        mf.write_json(out / f"trl_{kind}.json", trl_result(out, kind))
    fresh = {"generator": generator_info()}
    for name, kind in (("kto", "kto_lora_fresh"), ("dpo", "dpo_lora_fresh")):
        r = trl_result(out, kind)
        r.pop("generator")
        fresh[name] = r
    mf.write_json(out / "trl_lora_fresh.json", fresh)


OUTPUTS = [ADAPTER_DIR, "trl_kto_lora.json", "trl_dpo_lora.json", "trl_lora_fresh.json"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary directory and compare byte-for-byte with --out")
    ap.add_argument("--trl-worker", choices=sorted(LORA_RUNS), help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    check_versions()
    if args.trl_worker:
        run_worker(args.trl_worker, args.out, args.result)
        return
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            shutil.copytree(args.out / "tiny-llama", tmp / "tiny-llama")
            shutil.copytree(args.out / "data", tmp / "data")
            generate(tmp)
            diffs = []
            for name in OUTPUTS:
                a, b = args.out / name, tmp / name
                if a.is_dir():
                    diffs += [str(d) for d in mf.compare_trees(a, b)]
                elif not a.exists() or a.read_bytes() != b.read_bytes():
                    diffs.append(name)
        if diffs:
            print("DIFFERENT:", *diffs, sep="\n  ")
            sys.exit(1)
        print("LoRA fixtures are byte-identical")
        return
    generate(args.out)


if __name__ == "__main__":
    main()
