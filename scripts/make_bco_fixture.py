#!/usr/bin/env python
"""The BCO reference fixture, `tests/fixtures/trl_bco.json`: 3 optimizer steps of TRL's own `BCOTrainer`.

TRL 1.16 (the version the other fixtures pin) no longer ships `BCOTrainer`; TRL 1.13.0 is the last release
that does (`trl.experimental.bco`), and it runs with the same torch / transformers / accelerate / datasets as
the other fixtures. Install it beside the reference environment without touching that environment's TRL, and
put it first on the path (from the repository root, after `scripts/make_fixtures.py` has written
`tests/fixtures/tiny-llama/` and `tests/fixtures/data/`):

    /opt/pyref/bin/python -m pip install --no-deps --no-cache-dir --target /tmp/trl-1.13 trl==1.13.0
    PYTHONPATH=/tmp/trl-1.13 /opt/pyref/bin/python scripts/make_bco_fixture.py
    PYTHONPATH=/tmp/trl-1.13 /opt/pyref/bin/python scripts/make_bco_fixture.py --check   # byte-identical?

Pins (asserted): torch 2.15.0, transformers 5.24.0, trl 1.13.0, tokenizers 0.23.3, accelerate 1.15.0,
datasets 5.2.0. Seed 0, one CPU thread, deterministic algorithms.

The run mirrors `trl_kto.json` (scripts/make_fixtures.py): tiny-llama, `data/unpaired.jsonl` in file order,
microbatch 2 x accumulation 4, lr 1e-2 constant, no weight decay, clipping at 1, beta 0.1, 3 steps. One
difference: max_length 64 instead of 32. TRL 1.13's BCO truncation reserves a slot for EOS and appends it
after truncating (a 51-token row becomes 30 tokens + EOS), while TRL 1.16's trainers and Prospect keep the
first max_length tokens; at 64 no row is truncated, so both sides see the same token ids (checked below).

What it records:
* `rows`: BCO's token ids per row (prompt ids, prompt + completion + EOS ids, label), in TRL's order;
* `steps`: per optimizer step
  - `trl_log`: TRL's log entry, verbatim. Its `rewards/*`, `logps/*` are sums over the step's rows divided by
    counts (BCOTrainer's own `log`), and `delta` is the mean over the step's microbatches of δ;
  - flat keys in Prospect's terms, for `crates/prospect/tests/{trl_bco,loss_conformance}.rs`: `loss`,
    `grad_norm`, `learning_rate`, `epoch` and `delta` copied from `trl_log`, and `rewards/chosen`,
    `rewards/rejected`, `rewards/margins`, `logps/chosen`, `logps/rejected` as Prospect (and TRL 1.16's
    trainers) aggregate a metric: the mean over the step's microbatches of each microbatch's per-class mean
    (margins over the microbatches that hold both classes), computed from TRL's per-microbatch sums and counts;
  - `microbatches`: the rows TRL fed, its loss and stored metrics, and the inputs and outputs of each
    `bco_loss` call: the four log-prob vectors, TRL's `RunningMoments` (count, mean, var) before and after,
    δ, and the per-row losses;
* `running`: `RunningMoments` after the 3 steps (what TRL's checkpoint saves as `running.json`);
* `final_params`: the sum and L2 norm of every parameter after the 3 steps.

This file is our own code; it drives TRL but copies none of its code.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets the offline / single-thread environment before torch loads)

import torch  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

SCRIPT = "scripts/make_bco_fixture.py"
PINS = dict(mf.PINS, trl="1.13.0")
SEED = 0
MAX_LENGTH = 64
# make_fixtures' TRL arguments, with BCO's beta and the longer max_length (see above).
ARGS = dict(mf.COMMON_ARGS, max_length=MAX_LENGTH, beta=0.1, gradient_checkpointing=False)


def check_versions() -> dict:
    return mf.check_versions(PINS, ". TRL 1.13.0 goes on PYTHONPATH; see this script's docstring")


def generator_info() -> dict:
    v = check_versions()
    return {"script": SCRIPT, **{k: v[k] for k in ("torch", "transformers", "trl", "tokenizers")}, "seed": SEED}


def moments(running) -> list:
    return [float(running.count), float(running.mean), float(running.var)]


def run_bco(out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed
    from trl.experimental.bco import BCOConfig, BCOTrainer

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    set_seed(SEED)
    model_dir = out / "tiny-llama"
    raw_rows = mf.read_jsonl(out / "data" / "unpaired.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    calls, microbatches = [], []

    class Recording(BCOTrainer):
        """BCOTrainer, noting what each microbatch's loss saw and produced."""

        def bco_loss(self, pc, pr, rc, rr, ce, re, do_train=True):
            before = moments(self.running)
            losses, chosen_rewards, rejected_rewards, delta = super().bco_loss(pc, pr, rc, rr, ce, re, do_train)
            calls.append({
                "policy_chosen": mf.f32_list(pc), "policy_rejected": mf.f32_list(pr),
                "reference_chosen": mf.f32_list(rc), "reference_rejected": mf.f32_list(rr),
                "running_before": before, "running_after": moments(self.running),
                "delta": float(delta), "losses": mf.f32_list(losses),
            })
            return losses, chosen_rewards, rejected_rewards, delta

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._metrics_seen = None
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
            ids = [tuple(mf._trim(a, m)) for a, m in zip(inputs["completion_input_ids"].tolist(),
                                                         inputs["completion_attention_mask"].tolist())]
            loss_value = (loss[0] if return_outputs else loss).item()
            microbatches.append({"ids": ids, "loss": loss_value, "metrics": self._metrics_seen})
            return loss

        def store_metrics(self, metrics, train_eval="train"):
            # Called from compute_loss with this microbatch's metrics (sums and counts per class, and δ).
            self._metrics_seen = dict(metrics)
            super().store_metrics(metrics, train_eval)

    with tempfile.TemporaryDirectory() as tmp:
        args = BCOConfig(output_dir=tmp, **ARGS)
        trainer = Recording(model=str(model_dir), args=args, train_dataset=Dataset.from_list(raw_rows),
                            processing_class=tokenizer)
        rows = [dict(r) for r in trainer.train_dataset]
        assert len(rows) == len(raw_rows), "TRL dropped rows"
        trainer.train()
        running = moments(trainer.running)
        final_params = {
            n: {"shape": list(p.shape), "sum": p.detach().double().sum().item(),
                "l2_norm": p.detach().double().norm().item()}
            for n, p in trainer.model.named_parameters()
        }
    assert len(calls) == len(microbatches) == 12, (len(calls), len(microbatches))

    index = {tuple(r["completion_input_ids"]): i for i, r in enumerate(rows)}
    assert len(index) == len(rows), "duplicate rows"
    log_steps = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    assert len(log_steps) == ARGS["max_steps"]
    accumulation = ARGS["gradient_accumulation_steps"]
    steps = []
    for s, log in enumerate(log_steps):
        mbs = []
        for j in range(s * accumulation, (s + 1) * accumulation):
            mb, call = microbatches[j], calls[j]
            mbs.append({"rows": [index[k] for k in mb["ids"]], "loss": mb["loss"], "metrics": mb["metrics"], **call})
        entry = {"step": s + 1, **{k: log[k] for k in ("loss", "grad_norm", "learning_rate", "epoch", "delta")}}
        entry.update(prospect_means(mbs))
        entry["trl_log"] = log
        entry["microbatches"] = mbs
        steps.append(entry)

    _check_rows(tokenizer, rows, raw_rows)
    config = {"trainer": "BCOTrainer", "config_class": "BCOConfig", "model": "tests/fixtures/tiny-llama",
              "dataset": "tests/fixtures/data/unpaired.jsonl", **ARGS, "output_dir": "<tmp>"}
    return {
        "generator": generator_info(),
        "config": config,
        "rows": [{"prompt_ids": r["prompt_input_ids"], "completion_input_ids": r["completion_input_ids"],
                  "label": bool(r["label"])} for r in rows],
        "steps": steps,
        "running": running,
        "final_params": final_params,
    }


def prospect_means(mbs: list) -> dict:
    """Each metric as the mean over the microbatches that have it of the microbatch's own class mean."""
    per = {}
    for mb in mbs:
        m = mb["metrics"]
        means = {}
        for split in ("chosen", "rejected"):
            if f"count/{split}" in m:
                for metric in ("rewards", "logps"):
                    means[f"{metric}/{split}"] = m[f"{metric}/{split}_sum"] / m[f"count/{split}"]
        if "rewards/chosen" in means and "rewards/rejected" in means:
            means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        for k, v in means.items():
            per.setdefault(k, []).append(v)
    keys = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
    return {k: sum(per[k]) / len(per[k]) for k in keys if k in per}


def _check_rows(tokenizer, rows, raw_rows) -> None:
    """TRL's ids decode to the row's text + EOS, untruncated: max_length left every row whole."""
    for r, t in zip(rows, raw_rows, strict=True):
        assert tokenizer.decode(r["completion_input_ids"]) == t["prompt"] + t["completion"] + mf.EOS, (r, t)
        assert r["completion_input_ids"][: len(r["prompt_input_ids"])] == r["prompt_input_ids"]
        assert len(r["completion_input_ids"]) < MAX_LENGTH - 1 and bool(r["label"]) == t["label"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=mf.DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="regenerate in memory and compare byte for byte")
    args = ap.parse_args()
    check_versions()
    result = run_bco(args.out)
    target = args.out / "trl_bco.json"
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / "trl_bco.json"
            mf.write_json(fresh, result)
            same = target.exists() and fresh.read_bytes() == target.read_bytes()
        print("trl_bco.json is byte-identical" if same else "DIFFERENT: trl_bco.json")
        sys.exit(0 if same else 1)
    mf.write_json(target, result)


if __name__ == "__main__":
    main()
