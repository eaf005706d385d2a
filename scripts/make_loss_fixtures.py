#!/usr/bin/env python
"""Reference fixtures for the losses beyond KTO/DPO/SFT (issue 3).

Run from the repository root, after `scripts/make_fixtures.py` has written `tests/fixtures/tiny-llama/`:

    /opt/pyref/bin/python scripts/make_loss_fixtures.py             # everything but the round trip
    /opt/pyref/bin/python scripts/make_loss_fixtures.py --roundtrip DIR

Pins (asserted): torch 2.15.0, transformers 5.24.0, trl 1.16.0, tokenizers 0.23.3 (see make_fixtures.PINS).
Seeds are fixed, torch runs on one CPU thread, and each TRL run is a fresh subprocess.

It writes, under `tests/fixtures/`:

* `tiny-llama-rm/`     tiny-llama as `LlamaForSequenceClassification` (num_labels=1, pad_token_id=0) with a
                       seeded `score.weight`: the starting point of the reward-model runs.
* `trl_ipo.json`       TRL 1.16 `DPOTrainer(loss_type=["ipo"], beta=0.1)`, 3 steps.
* `trl_hinge.json`     TRL 1.16 `DPOTrainer(loss_type=["hinge"], beta=0.1)`, 3 steps.
* `trl_reward.json`    TRL 1.16 `RewardTrainer` from `tiny-llama-rm/`, 3 steps, plus TRL's token ids.
  Both: paired.jsonl, microbatch 2 x accumulation 2, lr 1e-2 constant, max_grad_norm 1, sequential order.
* `loss_reference.json` each loss on seeded random log-probs: the loss and its gradient with respect to every
                       input, from TRL's own loss functions where TRL has one (`CPOTrainer.cpo_loss` for SimPO,
                       `ORPOTrainer.odds_ratio_loss` for ORPO) and from the formula in PyTorch otherwise.
* `torch_<loss>.json`  3-step trajectories of a small PyTorch reimplementation of Prospect's loop (same
                       tokenization, batching, weighting, AdamW and clipping) for simpo, orpo, cdpo, slic,
                       kto_zero, apo_zero_unpaired, csft and ppo_offline.
* `ppo_value_head.safetensors` the value head the PPO trajectory starts from.

`--roundtrip DIR` loads a reward model that Prospect saved (DIR = its `final/`) with
`AutoModelForSequenceClassification`, scores every pair of paired.jsonl, and writes `reward_roundtrip.json`.
The DIR used for the checked-in file is the `final/` of Prospect's reward run in
`crates/prospect/tests/loss_trajectories.rs` (`target/tmp/reward-roundtrip/final`).

This file is our own code; it drives TRL and transformers but copies none of their code.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets the offline / single-thread environment before torch loads)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SCRIPT = "scripts/make_loss_fixtures.py"
OUT = mf.DEFAULT_OUT
SEED = 0
STEPS = 3
MICRO = 2
ACCUM = 2
LR = 1e-2


def generator_info() -> dict:
    info = mf.generator_info()
    info["script"] = SCRIPT
    return info


# ----------------------------------------------------------------------------------------------------------------
# The reward model's starting folder
# ----------------------------------------------------------------------------------------------------------------
def build_reward_folder(out: Path) -> None:
    from transformers import AutoModelForSequenceClassification, set_seed

    dest = out / "tiny-llama-rm"
    if dest.exists():
        shutil.rmtree(dest)
    set_seed(SEED + 10)
    model = AutoModelForSequenceClassification.from_pretrained(str(out / "tiny-llama"), num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED + 11)
        model.score.weight.copy_(0.3 * torch.randn(model.score.weight.shape, generator=g))
    model.config.pad_token_id = 0
    model.save_pretrained(str(dest), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(out / "tiny-llama" / name, dest / name)


# ----------------------------------------------------------------------------------------------------------------
# TRL runs (each in a subprocess)
# ----------------------------------------------------------------------------------------------------------------
COMMON = dict(
    per_device_train_batch_size=MICRO,
    gradient_accumulation_steps=ACCUM,
    learning_rate=LR,
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.0,
    max_grad_norm=1.0,
    max_steps=STEPS,
    train_sampling_strategy="sequential",
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

TRL_RUNS = {
    "ipo": dict(trainer="DPOTrainer", model="tiny-llama", extra=dict(beta=0.1, loss_type=["ipo"], max_length=32)),
    "hinge": dict(trainer="DPOTrainer", model="tiny-llama", extra=dict(beta=0.1, loss_type=["hinge"], max_length=32)),
    # max_length 64: RewardTrainer drops longer pairs (Prospect truncates), so no pair may reach it.
    "reward": dict(trainer="RewardTrainer", model="tiny-llama-rm", extra=dict(max_length=64)),
}


def run_trl(kind: str, out: Path, result_path: Path) -> None:
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    set_seed(SEED)
    spec = TRL_RUNS[kind]
    model_dir = out / spec["model"]
    rows = mf.read_jsonl(out / "data" / "paired.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    trainer_cls = getattr(trl, spec["trainer"])
    config_cls = getattr(trl, spec["trainer"].replace("Trainer", "Config"))
    with tempfile.TemporaryDirectory() as tmp:
        args = config_cls(output_dir=tmp, **COMMON, **spec["extra"])
        trainer = trainer_cls(model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer)
        tokenized = [dict(r) for r in trainer.train_dataset]
        assert len(tokenized) == len(rows), "TRL dropped rows; raise max_length"
        trainer.train()
        final_params = {
            n: {"shape": list(p.shape), "sum": p.detach().double().sum().item(),
                "l2_norm": p.detach().double().norm().item()}
            for n, p in trainer.model.named_parameters()
        }
    steps = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    assert len(steps) == STEPS
    result = {
        "config": {"trainer": spec["trainer"], "model": f"tests/fixtures/{spec['model']}",
                   "dataset": "tests/fixtures/data/paired.jsonl", **COMMON, **spec["extra"]},
        "steps": [{"step": i + 1, "log": e} for i, e in enumerate(steps)],
        "final_params": final_params,
    }
    if kind == "reward":
        result["rows"] = [{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in tokenized]
    result_path.write_text(json.dumps(result))


def make_trl(out: Path, kind: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / f"{kind}.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--trl-worker", kind,
                        "--result", str(res)], check=True)
        result = json.loads(res.read_text())
    mf.write_json(out / f"trl_{kind}.json", {"generator": generator_info(), **result})


# ----------------------------------------------------------------------------------------------------------------
# The formulas, in PyTorch (each mirrors one `crates/prospect/src/loss/*.rs` doc comment)
# ----------------------------------------------------------------------------------------------------------------
def simpo_trl(pc, pr, nc, nr, beta=2.0, gamma=0.5):
    """TRL's CPOTrainer.cpo_loss, loss_type="simpo", on average log-probs (cpo_alpha = 0: no NLL term)."""
    from trl.experimental.cpo import CPOTrainer

    class Acc:
        device = torch.device("cpu")

    ns = type("NS", (), dict(loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=0.0, alpha=0.0,
                             accelerator=Acc()))()
    losses, cr, rr = CPOTrainer.cpo_loss(ns, pc / nc, pr / nr)
    return losses.mean(), cr, rr


def orpo_trl(pc, pr, nc, nr, beta=0.1):
    """TRL's ORPOTrainer.odds_ratio_loss on average log-probs, plus the NLL over chosen completion tokens."""
    from trl.experimental.orpo import ORPOTrainer

    class Acc:
        device = torch.device("cpu")

    ns = type("NS", (), dict(beta=beta, accelerator=Acc()))()
    losses, cr, rr, _, _ = ORPOTrainer.odds_ratio_loss(ns, pc / nc, pr / nr)
    nll = -pc.sum() / nc.sum()
    return nll - losses.mean(), cr, rr


def cdpo(pc, pr, rc, rr, beta=0.1, eps=0.2):
    logits = beta * ((pc - rc) - (pr - rr))
    return ((1 - eps) * -F.logsigmoid(logits) + eps * -F.logsigmoid(-logits)).mean()


def ipo(pc, pr, rc, rr, nc, nr, tau=0.1):
    h = (pc - rc) / nc.clamp(min=1) - (pr - rr) / nr.clamp(min=1)
    return ((h - 1 / (2 * tau)) ** 2).mean()


def slic(pc, pr, delta=1.0, lam=0.1):
    return (torch.clamp(delta - pc + pr, min=0) + lam * -pc).mean()


def kto_zero(p, r, labels, beta=0.1, wd=1.0, wu=1.0):
    x = beta * (p - r)
    return torch.where(labels, wd * (1 - torch.sigmoid(x)), wu * (1 - torch.sigmoid(-x))).mean()


def apo_zero_unpaired(p, r, labels, beta=0.1, wd=1.0, wu=1.0):
    x = beta * (p - r)
    return torch.where(labels, wd * (1 - torch.sigmoid(x)), wu * torch.sigmoid(x)).mean()


def reward_bt(sc, sr):
    return -F.logsigmoid(sc - sr).mean()


def ppo_offline(logp, old_logp, values, mask, rewards, cliprange=0.5, gamma=0.99, lam=0.95, critic_coef=0.01,
                kl_coef=0.1):
    """HALOs' offline PPO (train/trainers.py PPOTrainer: compute_advantages + loss), ppo_epochs = 1."""
    b, n = logp.shape
    mmean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
    with torch.no_grad():
        v = values.detach() * mask
        r = torch.zeros_like(mask)
        for i in range(b):
            r[i, mask[i].nonzero()[-1]] = rewards[i]
        r = r * mask
        gae, adv_rev, future, fut_rev = 0.0, [], torch.zeros(b, dtype=mask.dtype), []
        for t in reversed(range(n)):
            delta = r[:, t] + gamma * (v[:, t + 1] if t < n - 1 else 0.0) - v[:, t]
            gae = delta + gamma * lam * gae
            adv_rev.append(gae)
            fut_rev.append(future)
            future = r[:, t] + gamma * future
        adv = torch.stack(adv_rev[::-1]).T * mask
        returns_after = torch.stack(fut_rev[::-1]).T * mask
        mean = mmean(adv)
        var = mmean((adv - mean) ** 2)  # biased, as HALOs' masked_var
        adv = ((adv - mean) * torch.rsqrt(var + 1e-8) * mask).detach()
    critic = 0.5 * mmean((values - returns_after) ** 2)
    ratio = torch.exp(logp - old_logp)
    pl = -adv * ratio
    plc = -adv * torch.clamp(ratio, cliprange, 1 / cliprange)
    policy = mmean(torch.max(pl, plc))
    kl = mmean(old_logp - logp)
    loss = policy + critic_coef * critic + kl_coef * kl
    return loss, {"loss/policy": policy.item(), "loss/critic": critic.item(), "kl": kl.item(),
                  "clipfrac": mmean(torch.gt(plc, pl).float()).item()}


# ----------------------------------------------------------------------------------------------------------------
# Loss-level reference: seeded random inputs -> loss and input gradients
# ----------------------------------------------------------------------------------------------------------------
def _leaf(x):
    return x.clone().double().requires_grad_(True)


def _case(name, fn, inputs: dict, grad_keys, consts: dict | None = None, **meta):
    leaves = {k: _leaf(v) if k in grad_keys else v for k, v in inputs.items()}
    loss = fn(**leaves, **(consts or {}))
    if isinstance(loss, tuple):
        loss = loss[0]
    loss.backward()
    entry = {"loss": float(loss.item()),
             "inputs": {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()},
             "grads": {k: leaves[k].grad.tolist() for k in grad_keys}}
    entry.update(meta)
    return name, entry


def make_loss_reference(out: Path) -> None:
    g = torch.Generator().manual_seed(SEED + 20)
    b = 4
    pc = -torch.rand(b, generator=g, dtype=torch.float64) * 30 - 1
    pr = -torch.rand(b, generator=g, dtype=torch.float64) * 30 - 1
    rc = pc + torch.randn(b, generator=g, dtype=torch.float64) * 2
    rr = pr + torch.randn(b, generator=g, dtype=torch.float64) * 2
    nc = torch.tensor([3.0, 7.0, 12.0, 25.0], dtype=torch.float64)
    nr = torch.tensor([5.0, 2.0, 12.0, 40.0], dtype=torch.float64)
    labels = torch.tensor([True, False, True, False])
    cases = dict([
        _case("simpo", lambda pc, pr, nc, nr: simpo_trl(pc, pr, nc, nr), dict(pc=pc, pr=pr, nc=nc, nr=nr), ["pc", "pr"],
              source="trl.experimental.cpo.CPOTrainer.cpo_loss(loss_type='simpo', beta=2.0, simpo_gamma=0.5)"),
        _case("orpo", lambda pc, pr, nc, nr: orpo_trl(pc, pr, nc, nr), dict(pc=pc, pr=pr, nc=nc, nr=nr), ["pc", "pr"],
              source="NLL(chosen tokens) - mean(trl.experimental.orpo.ORPOTrainer.odds_ratio_loss(beta=0.1))"),
        _case("cdpo", cdpo, dict(pc=pc, pr=pr, rc=rc, rr=rr), ["pc", "pr"], source="formula, beta=0.1, eps=0.2"),
        _case("ipo", ipo, dict(pc=pc, pr=pr, rc=rc, rr=rr, nc=nc, nr=nr), ["pc", "pr"], source="formula, tau=0.1"),
        _case("slic", slic, dict(pc=pc, pr=pr), ["pc", "pr"], source="formula, delta=1.0, lambda_coef=0.1"),
        _case("kto_zero", kto_zero, dict(p=pc, r=rc, labels=labels), ["p"], source="formula, beta=0.1"),
        _case("apo_zero_unpaired", apo_zero_unpaired, dict(p=pc, r=rc, labels=labels), ["p"],
              source="formula (TRL KTOTrainer loss_type='apo_zero_unpaired'), beta=0.1"),
        _case("reward", reward_bt, dict(sc=pc / 10, sr=pr / 10), ["sc", "sr"], source="formula (TRL RewardTrainer)"),
    ])
    # PPO: per-token tensors, 3 rows x 6 positions, prompt/padding masked.
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.float64)
    logp = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 3 * mask
    old = (logp + torch.randn(3, 6, generator=g, dtype=torch.float64) * 0.8) * mask
    values = torch.randn(3, 6, generator=g, dtype=torch.float64)
    rewards = torch.tensor([1.0, -1.0, 0.7], dtype=torch.float64)
    name, entry = _case("ppo_offline", lambda logp, old, values, mask, rewards: ppo_offline(logp, old, values, mask, rewards),
                        dict(logp=logp, old=old, values=values, mask=mask, rewards=rewards), ["logp", "values"],
                        source="HALOs PPOTrainer formula (compute_advantages + loss), HALOs defaults")
    lv, lg, vv = _leaf(logp), _leaf(values), values
    _, stats = ppo_offline(lv, old, lg, mask, rewards)
    entry["stats"] = stats
    cases[name] = entry
    mf.write_json(out / "loss_reference.json", {"generator": generator_info(), "cases": cases})


# ----------------------------------------------------------------------------------------------------------------
# A small PyTorch reimplementation of Prospect's training loop, for 3-step trajectories
# ----------------------------------------------------------------------------------------------------------------
def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tok_text(tok, prompt, completion):
    """Prospect's `tokenize_text` (= TRL's): eos appended, completion starts where the two encodings diverge."""
    if not completion.endswith(mf.EOS):
        completion += mf.EOS
    p = tok(prompt)["input_ids"]
    full = tok(prompt + completion)["input_ids"]
    n = common_prefix(p, full)
    return p[:n], full[n:]


def tok_pair(tok, prompt, chosen, rejected):
    """Prospect's `tokenize_pair` (= TRL's DPO tokenization)."""
    p = tok(prompt)["input_ids"]
    fc = tok(prompt + (chosen if chosen.endswith(mf.EOS) else chosen + mf.EOS))["input_ids"]
    fr = tok(prompt + (rejected if rejected.endswith(mf.EOS) else rejected + mf.EOS))["input_ids"]
    n = min(common_prefix(p, fc), common_prefix(p, fr))
    return (p[:n], fc[n:]), (p[:n], fr[n:])


def collate(seqs, max_length, pad=0):
    rows = []
    for prompt, completion in seqs:
        ids = (prompt + completion)[:max_length]
        mask = ([0] * len(prompt) + [1] * len(completion))[:max_length]
        rows.append((ids, mask))
    t = max(len(i) for i, _ in rows)
    ids = torch.tensor([i + [pad] * (t - len(i)) for i, _ in rows])
    cmask = torch.tensor([m + [0] * (t - len(m)) for _, m in rows], dtype=torch.float32)
    attn = torch.tensor([[1] * len(i) + [0] * (t - len(i)) for i, _ in rows])
    return ids, cmask, attn


def token_logps(model, ids, cmask, attn, hidden=False):
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=hidden)
    logits = out.logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)
    m = cmask[:, 1:]
    return lp * m, m, (out.hidden_states[-1] if hidden else None)


TORCH_RUNS = {
    # name: (data file, needs reference, loss function over a microbatch, max_length)
    "simpo": "paired", "orpo": "paired", "cdpo": "paired", "slic": "paired",
    "kto_zero": "unpaired", "apo_zero_unpaired": "unpaired", "csft": "unpaired", "ppo_offline": "unpaired",
}


def run_torch(kind: str, out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(out / "tiny-llama"))
    policy = AutoModelForCausalLM.from_pretrained(str(out / "tiny-llama"), dtype=torch.float32)
    policy.train()
    data = TORCH_RUNS[kind]
    rows = mf.read_jsonl(out / "data" / f"{data}.jsonl")
    ml = mf.MAX_LENGTH
    extra_params = []
    control = None
    if kind == "csft":
        tok.add_tokens(["<|good|>", "<|bad|>"], special_tokens=True)
        control = (tok.convert_tokens_to_ids("<|good|>"), tok.convert_tokens_to_ids("<|bad|>"))
        assert control == (400, 401), control
        emb = policy.get_input_embeddings().weight.data
        mean = emb.mean(0, keepdim=True)
        policy.resize_token_embeddings(402, mean_resizing=False)
        with torch.no_grad():
            policy.get_input_embeddings().weight[400:] = mean
    reference = None
    if kind in ("cdpo", "kto_zero", "apo_zero_unpaired", "ppo_offline"):
        reference = copy.deepcopy(policy).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    v_head = None
    if kind == "ppo_offline":
        g = torch.Generator().manual_seed(SEED + 30)
        v_head = torch.nn.Linear(32, 1)
        with torch.no_grad():
            v_head.weight.copy_(0.3 * torch.randn(1, 32, generator=g))
            v_head.bias.zero_()
        from safetensors.torch import save_file
        save_file({"v_head.summary.weight": v_head.weight.detach().clone(), "v_head.summary.bias": v_head.bias.detach().clone()},
                  str(out / "ppo_value_head.safetensors"), metadata={"format": "pt"})
        extra_params = list(v_head.parameters())
    if data == "paired":
        examples = [tok_pair(tok, r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    else:
        examples = [(tok_text(tok, r["prompt"], r["completion"]), r["label"]) for r in rows]
    params = [p for p in policy.parameters()] + extra_params
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    n = len(examples)
    bs = MICRO * ACCUM
    steps_per_epoch = math.ceil(n / bs)
    history = []
    for step in range(STEPS):
        k = step % steps_per_epoch
        batch = list(range(k * bs, min((k + 1) * bs, n)))
        mbs = [batch[i:i + MICRO] for i in range(0, len(batch), MICRO)]
        opt.zero_grad()
        total, metrics = 0.0, {}
        if kind == "csft":
            step_tokens = sum(min(ml, len(examples[i][0][0]) + len(examples[i][0][1]) + 1) - len(examples[i][0][0])
                              for i in batch)
        for mb in mbs:
            loss, m = microbatch_loss(kind, examples, mb, policy, reference, v_head, control, ml)
            weight = (m.pop("_tokens") / step_tokens) if kind == "csft" else 1.0 / len(mbs)
            (loss * weight).backward()
            total += (loss * weight).item()
            for key, v in m.items():
                metrics.setdefault(key, []).append(v)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        opt.step()
        entry = {"step": step + 1, "loss": total, "grad_norm": grad_norm}
        entry.update({key: sum(v) / len(v) for key, v in metrics.items()})
        history.append(entry)
    return {"generator": generator_info(),
            "config": {"reimplementation_of": "crates/prospect/src/train (Prospect's loop)", "loss": kind,
                       "model": "tests/fixtures/tiny-llama", "dataset": f"tests/fixtures/data/{data}.jsonl",
                       "microbatch_size": MICRO, "batch_size": bs, "learning_rate": LR, "lr_scheduler": "constant",
                       "max_grad_norm": 1.0, "max_length": ml, "shuffle": False, "loss_defaults": True},
            "steps": history}


def _paired_metrics(cr, rr):
    return {"rewards/chosen": cr.mean().item(), "rewards/rejected": rr.mean().item(),
            "rewards/margins": (cr - rr).mean().item(), "rewards/accuracies": (cr > rr).float().mean().item()}


def microbatch_loss(kind, examples, mb, policy, reference, v_head, control, ml):
    if TORCH_RUNS[kind] == "paired":
        seqs = [examples[i][0] for i in mb] + [examples[i][1] for i in mb]
        ids, cmask, attn = collate(seqs, ml)
        lp, m, _ = token_logps(policy, ids, cmask, attn)
        logps, counts = lp.sum(1), m.sum(1)
        b = len(mb)
        pc, pr, nc, nr = logps[:b], logps[b:], counts[:b], counts[b:]
        if kind == "simpo":
            loss, cr, rr = simpo_trl(pc, pr, nc.clamp(min=1), nr.clamp(min=1))
        elif kind == "orpo":
            loss, cr, rr = orpo_trl(pc, pr, nc.clamp(min=1), nr.clamp(min=1))
        elif kind == "slic":
            loss, cr, rr = slic(pc, pr), pc.detach(), pr.detach()
        else:  # cdpo
            with torch.no_grad():
                rl = token_logps(reference, ids, cmask, attn)[0].sum(1)
            rc, rrf = rl[:b], rl[b:]
            loss = cdpo(pc, pr, rc, rrf)
            cr, rr = 0.1 * (pc - rc).detach(), 0.1 * (pr - rrf).detach()
        return loss, _paired_metrics(cr.detach(), rr.detach())
    labels = torch.tensor([examples[i][1] for i in mb])
    if kind == "csft":
        good, bad = control
        seqs = [(examples[i][0][0], [good if examples[i][1] else bad] + examples[i][0][1]) for i in mb]
        ids, cmask, attn = collate(seqs, ml)
        lp, m, _ = token_logps(policy, ids, cmask, attn)
        tokens = m.sum().item()
        return -lp.sum() / tokens, {"_tokens": tokens}
    seqs = [examples[i][0] for i in mb]
    ids, cmask, attn = collate(seqs, ml)
    if kind == "ppo_offline":
        lp, m, hidden = token_logps(policy, ids, cmask, attn, hidden=True)
        values = v_head(hidden).squeeze(-1)[:, :-1]
        with torch.no_grad():
            old = token_logps(reference, ids, cmask, attn)[0]
        rewards = torch.where(labels, 1.0, -1.0)
        loss, stats = ppo_offline(lp, old, values, m, rewards)
        return loss, stats
    lp, m, _ = token_logps(policy, ids, cmask, attn)
    with torch.no_grad():
        rl = token_logps(reference, ids, cmask, attn)[0].sum(1)
    p = lp.sum(1)
    loss = kto_zero(p, rl, labels) if kind == "kto_zero" else apo_zero_unpaired(p, rl, labels)
    r = 0.1 * (p - rl).detach()
    m = {}
    if labels.any():
        m["rewards/chosen"] = r[labels].mean().item()
    if (~labels).any():
        m["rewards/rejected"] = r[~labels].mean().item()
    return loss, m


# ----------------------------------------------------------------------------------------------------------------
# Reward-model round trip
# ----------------------------------------------------------------------------------------------------------------
def roundtrip(out: Path, folder: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert model.config.num_labels == 1 and model.config.pad_token_id == 0, model.config
    rows = mf.read_jsonl(out / "data" / "paired.jsonl")
    texts = [r["prompt"] + r["chosen"] + mf.EOS for r in rows] + [r["prompt"] + r["rejected"] + mf.EOS for r in rows]
    enc = [tok(t)["input_ids"] for t in texts]
    t = max(len(e) for e in enc)
    ids = torch.tensor([e + [0] * (t - len(e)) for e in enc])
    attn = torch.tensor([[1] * len(e) + [0] * (t - len(e)) for e in enc])
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=attn).logits.squeeze(-1)
    n = len(rows)
    mf.write_json(out / "reward_roundtrip.json", {
        "generator": generator_info(),
        "folder": "final/ of Prospect's `reward` run in crates/prospect/tests/loss_trajectories.rs",
        "architectures": model.config.architectures,
        "loaded_class": type(model).__name__,
        "chosen_scores": mf.f32_list(scores[:n]),
        "rejected_scores": mf.f32_list(scores[n:]),
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare byte for byte")
    ap.add_argument("--roundtrip", type=Path, help="score a Prospect reward model folder with transformers")
    ap.add_argument("--only", help="comma-separated subset: rm,trl,reference,torch")
    ap.add_argument("--runs", help="with --only torch: comma-separated subset of the PyTorch trajectories")
    ap.add_argument("--trl-worker", choices=sorted(TRL_RUNS), help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    mf.check_versions()
    if args.trl_worker:
        run_trl(args.trl_worker, args.out, args.result)
        return
    if args.roundtrip:
        roundtrip(args.out, args.roundtrip)
        return
    if args.check:
        check(args.out)
        return
    generate(args.out, args.only, args.runs)


GENERATED = ["tiny-llama-rm", "loss_reference.json", "ppo_value_head.safetensors"] + [
    f"trl_{k}.json" for k in TRL_RUNS] + [f"torch_{k}.json" for k in TORCH_RUNS]


def check(out: Path) -> None:
    """Regenerate into a temporary copy of the inputs and compare byte for byte."""
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        shutil.copytree(out / "tiny-llama", t / "tiny-llama")
        shutil.copytree(out / "data", t / "data")
        generate(t, None, None)
        diffs = [name for name in GENERATED if _differs(out / name, t / name)]
    if diffs:
        print("DIFFERENT:", *diffs, sep="\n  ")
        sys.exit(1)
    print("loss fixtures are byte-identical")


def _differs(a: Path, b: Path) -> bool:
    import filecmp

    if a.is_dir():
        return bool(mf.compare_trees(a, b))
    return not (b.exists() and filecmp.cmp(a, b, shallow=False))


def generate(out: Path, only_arg, runs_arg) -> None:
    only = set(only_arg.split(",")) if only_arg else {"rm", "trl", "reference", "torch"}
    runs = set(runs_arg.split(",")) if runs_arg else set(TORCH_RUNS)
    if "rm" in only:
        build_reward_folder(out)
    if "trl" in only:
        for kind in TRL_RUNS:
            make_trl(out, kind)
    if "reference" in only:
        make_loss_reference(out)
    if "torch" in only:
        for kind in [k for k in TORCH_RUNS if k in runs]:
            mf.write_json(out / f"torch_{kind}.json", run_torch(kind, out))


if __name__ == "__main__":
    main()
