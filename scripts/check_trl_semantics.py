#!/usr/bin/env python
"""Independent re-implementation of the TRL 1.16 semantics recorded in tests/fixtures/trl_*.json.

Uses only the tokenizer, the plain HF model forward (full logits + log_softmax) and hand-written KTO / DPO / SFT
losses, gradient accumulation, clipping and AdamW -- no TRL code. It checks that this description of TRL reproduces
the token ids, the per-step logs and the final weights in the fixtures. It is the executable form of the semantics
the Rust side has to implement.

    /opt/pyref/bin/python scripts/check_trl_semantics.py
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FIX = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
EOS = "<|endoftext|>"


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------- tokenization (the part the Rust side reimplements)
def tok_ids(tokenizer, text):
    return tokenizer(text)["input_ids"]  # add_special_tokens=True: BOS only if the tokenizer's post-processor adds it


def kto_rows(tokenizer, data, batch_size, max_length):
    if "chosen" in data[0]:  # unpair: all chosen rows, then all rejected rows
        data = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in data] + [
            {"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in data]
    rows = []
    for r in data:
        completion = r["completion"] if r["completion"].endswith(EOS) else r["completion"] + EOS
        p = tok_ids(tokenizer, r["prompt"])
        pc = tok_ids(tokenizer, r["prompt"] + completion)
        n = common_prefix(p, pc)
        rows.append({"prompt_ids": p[:n], "completion_ids": pc[n:], "label": r["label"]})
    rows = [r for r in rows if len(r["prompt_ids"]) < max_length]
    for s in range(0, len(rows), batch_size):  # rotate completions by +1 inside each chunk of batch_size rows
        chunk = rows[s:s + batch_size]
        comps = [r["completion_ids"] for r in chunk]
        for r, kl in zip(chunk, comps[-1:] + comps[:-1]):
            r["KL_completion_ids"] = kl
    return rows


def dpo_rows(tokenizer, data, max_length):
    rows = []
    for r in data:
        ch = r["chosen"] if r["chosen"].endswith(EOS) else r["chosen"] + EOS
        rj = r["rejected"] if r["rejected"].endswith(EOS) else r["rejected"] + EOS
        p = tok_ids(tokenizer, r["prompt"])
        pc = tok_ids(tokenizer, r["prompt"] + ch)
        pr = tok_ids(tokenizer, r["prompt"] + rj)
        n = min(common_prefix(p, pc), common_prefix(p, pr))
        rows.append({"prompt_ids": p[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]})
    return [r for r in rows if len(r["prompt_ids"]) < max_length]


def sft_rows(tokenizer, data, max_length):
    rows = []
    for r in data:
        c = r["completion"] if r["completion"].endswith(EOS) else r["completion"] + EOS
        p = tok_ids(tokenizer, r["prompt"])
        pc = tok_ids(tokenizer, r["prompt"] + c)
        n = common_prefix(p, pc)
        labels = [-100] * n + pc[n:]
        ids, labels = pc[:max_length], labels[:max_length]
        if any(x != -100 for x in labels):
            rows.append({"input_ids": ids, "labels": labels, "completion_mask": [int(x != -100) for x in labels]})
    return rows


# ---------------------------------------------------------------- batching
def pad_right(seqs, value):
    t = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (t - len(s)) for s in seqs])


def collate(seqs, masks, pad_id):
    return (pad_right(seqs, pad_id), pad_right([[1] * len(s) for s in seqs], 0), pad_right(masks, 0))


def token_stats(model, ids, attn, cmask):
    """Per-token completion log-probs and the metric helpers, from full logits (positions 0..t-2 predict 1..t-1)."""
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1)
    tgt = ids[:, 1:]
    m = cmask[:, 1:].to(logp.dtype)
    tok = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * m
    with torch.no_grad():
        p = logp.exp()
        entropy = -(p * logp).sum(-1) * m
        mean_logits = logits.mean(-1) * m
        is_top1 = (logits.argmax(-1) == tgt) & m.bool()
    return tok, m, entropy, mean_logits, is_top1


# ---------------------------------------------------------------- optimizer pieces
class AdamW:
    def __init__(self, params, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
        self.params, self.lr, self.b1, self.b2, self.eps, self.wd, self.t = list(params), lr, b1, b2, eps, wd, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        self.t += 1
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            p.mul_(1 - self.lr * self.wd)
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / bc1)


def clip_(params, max_norm):
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef)
    return norm.item()


def schedule(n_rows, bs, ga, max_steps):
    """Sequential sampler, no drop_last: microbatches of bs rows; ga microbatches per step; the last step of an epoch
    takes the remaining microbatches; a new epoch starts over at row 0."""
    mbs = [list(range(s, min(s + bs, n_rows))) for s in range(0, n_rows, bs)]
    steps_per_epoch = math.ceil(len(mbs) / ga)
    epoch = [mbs[i * ga:(i + 1) * ga] for i in range(steps_per_epoch)]
    out = []
    while len(out) < max_steps:
        out.extend(epoch)
    return out[:max_steps]


# ---------------------------------------------------------------- the three losses
def kto_microbatch(policy, ref, rows, idx, cfg, pad_id):
    ml, beta = cfg["max_length"], cfg["beta"]
    rs = [rows[i] for i in idx]
    main = collate([(r["prompt_ids"] + r["completion_ids"])[:ml] for r in rs],
                   [([0] * len(r["prompt_ids"]) + [1] * len(r["completion_ids"]))[:ml] for r in rs], pad_id)
    kl_b = collate([(r["prompt_ids"] + r["KL_completion_ids"])[:ml] for r in rs],
                   [([0] * len(r["prompt_ids"]) + [1] * len(r["KL_completion_ids"]))[:ml] for r in rs], pad_id)
    label = torch.tensor([bool(r["label"]) for r in rs])
    with torch.no_grad():
        kl_pol = token_stats(policy, *kl_b)[0].sum(-1)
        kl_ref = token_stats(ref, *kl_b)[0].sum(-1)
        ref_logps = token_stats(ref, *main)[0].sum(-1)
    tok, m, ent, mlog, _ = token_stats(policy, *main)
    logps = tok.sum(-1)
    kl = (kl_pol - kl_ref).mean().clamp(min=0)  # per microbatch, detached
    ratio = logps - ref_logps
    losses = torch.where(label, 1 - torch.sigmoid(beta * (ratio - kl)), 1 - torch.sigmoid(beta * (kl - ratio)))
    w = torch.where(label, torch.tensor(cfg["desirable_weight"]), torch.tensor(cfg["undesirable_weight"]))
    # TRL orders the per-example losses [chosen..., rejected...] before the mean; the mean is order independent
    loss = (w * losses).mean()
    met = {"kl": kl.item(), "entropy": (ent.sum() / m.sum()).item()}
    rewards = beta * ratio.detach()
    for name, sel in (("chosen", label), ("rejected", ~label)):
        if sel.any():
            met[f"rewards/{name}"] = rewards[sel].sum().item() / sel.sum().item()
            met[f"logps/{name}"] = logps.detach()[sel].sum().item() / sel.sum().item()
            met[f"logits/{name}"] = (mlog[sel].sum() / m[sel].sum()).item()
    if label.any() and (~label).any():
        met["rewards/margins"] = met["rewards/chosen"] - met["rewards/rejected"]
    return loss, met, int(main[1].sum())


def dpo_microbatch(policy, ref, rows, idx, cfg, pad_id):
    ml, beta = cfg["max_length"], cfg["beta"]
    rs = [rows[i] for i in idx]
    seqs = [(r["prompt_ids"] + r["chosen_ids"])[:ml] for r in rs] + [(r["prompt_ids"] + r["rejected_ids"])[:ml]
                                                                      for r in rs]
    masks = [([0] * len(r["prompt_ids"]) + [1] * len(r["chosen_ids"]))[:ml] for r in rs] + [
        ([0] * len(r["prompt_ids"]) + [1] * len(r["rejected_ids"]))[:ml] for r in rs]
    batch = collate(seqs, masks, pad_id)  # chosen and rejected in ONE forward, padded to a common width
    with torch.no_grad():
        ref_logps = token_stats(ref, *batch)[0].sum(-1)
    tok, m, ent, mlog, top1 = token_stats(policy, *batch)
    logps = tok.sum(-1)
    b = len(rs)
    c, r = logps[:b], logps[b:]
    rc, rr = ref_logps[:b], ref_logps[b:]
    loss = -F.logsigmoid(beta * ((c - rc) - (r - rr))).mean()
    cr, rj = beta * (c - rc).detach(), beta * (r - rr).detach()
    met = {
        "entropy": (ent.sum() / m.sum()).item(),
        "logits/chosen": (mlog[:b].sum() / m[:b].sum()).item(),
        "logits/rejected": (mlog[b:].sum() / m[b:].sum()).item(),
        "mean_token_accuracy": (top1[:b].sum() / m[:b].sum()).item(),
        "rewards/chosen": cr.mean().item(),
        "rewards/rejected": rj.mean().item(),
        "rewards/accuracies": (cr > rj).float().mean().item(),
        "rewards/margins": (cr - rj).mean().item(),
        "logps/chosen": c.detach().mean().item(),
        "logps/rejected": r.detach().mean().item(),
    }
    return loss, met, int(batch[1].sum())


def sft_microbatch(policy, rows, idx, num_items, pad_id):
    rs = [rows[i] for i in idx]
    ids, attn, cmask = collate([r["input_ids"] for r in rs], [r["completion_mask"] for r in rs], pad_id)
    tok, m, ent, _, top1 = token_stats(policy, ids, attn, cmask)
    loss = -tok.sum() / num_items  # normalised by the completion tokens of the WHOLE optimizer step
    met = {"entropy": (ent.sum() / m.sum()).item(), "mean_token_accuracy": (top1.sum() / m.sum()).item()}
    return loss, met, int(attn.sum())


# ---------------------------------------------------------------- driver
def run(kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    fx = json.loads((FIX / f"trl_{kind}.json").read_text())
    cfg = fx["config"]
    tokenizer = AutoTokenizer.from_pretrained(str(FIX / "tiny-llama"))
    data = [json.loads(x) for x in (FIX.parent.parent / cfg["dataset"]).read_text().splitlines() if x.strip()]
    if cfg["trainer"] == "KTOTrainer":
        rows = kto_rows(tokenizer, data, cfg["per_device_train_batch_size"], cfg["max_length"])
        keys = ["prompt_ids", "completion_ids", "KL_completion_ids", "label"]
    elif cfg["trainer"] == "DPOTrainer":
        rows = dpo_rows(tokenizer, data, cfg["max_length"])
        keys = ["prompt_ids", "chosen_ids", "rejected_ids"]
    else:
        rows = sft_rows(tokenizer, data, cfg["max_length"])
        keys = ["input_ids", "labels", "completion_mask"]
    assert [{k: r[k] for k in keys} for r in rows] == fx["rows"], f"{kind}: token ids differ"

    policy = AutoModelForCausalLM.from_pretrained(str(FIX / "tiny-llama"), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(FIX / "tiny-llama"), dtype=torch.float32).eval()
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = AdamW(params, cfg["learning_rate"], wd=cfg["weight_decay"])
    sched = schedule(len(rows), cfg["per_device_train_batch_size"], cfg["gradient_accumulation_steps"],
                     cfg["max_steps"])
    ga = cfg["gradient_accumulation_steps"]
    pad_id = tokenizer.pad_token_id
    worst = {}
    total_tokens = 0
    for s, mbs in enumerate(sched):
        assert [mb["rows"] for mb in fx["steps"][s]["microbatches"]] == mbs, f"{kind}: schedule differs at step {s+1}"
        policy.zero_grad()
        logged_loss, mets = 0.0, []
        if cfg["trainer"] == "SFTTrainer":
            num_items = sum(sum(x for x in rows[i]["completion_mask"][1:]) for mb in mbs for i in mb)
        for idx in mbs:
            if cfg["trainer"] == "KTOTrainer":
                loss, met, ntok = kto_microbatch(policy, ref, rows, idx, cfg, pad_id)
                loss = loss / len(mbs)  # not pre-scaled: Trainer divides by the number of microbatches in this step
            elif cfg["trainer"] == "DPOTrainer":
                loss, met, ntok = dpo_microbatch(policy, ref, rows, idx, cfg, pad_id)
                loss = loss / len(mbs)
            else:
                loss, met, ntok = sft_microbatch(policy, rows, idx, num_items, pad_id)  # already scaled
            loss.backward()
            logged_loss += loss.item()
            total_tokens += ntok
            mets.append(met)
        grad_norm = clip_(params, cfg["max_grad_norm"])
        opt.step()
        mine = {"loss": logged_loss, "grad_norm": grad_norm, "learning_rate": cfg["learning_rate"],
                "num_tokens": float(total_tokens)}
        for k in {k for m in mets for k in m}:
            vals = [m[k] for m in mets if k in m]
            mine[k] = sum(vals) / len(vals)  # metrics: plain mean over the microbatches that produced them
        log = fx["steps"][s]["log"]
        assert set(log) - {"epoch", "step"} == set(mine), (kind, sorted(set(log) ^ set(mine)))
        for k, v in mine.items():
            err = abs(v - log[k]) / max(1.0, abs(log[k]))
            worst[k] = max(worst.get(k, 0.0), err)
    pw = 0.0
    for n, p in policy.named_parameters():
        want = fx["final_params"][n]
        pw = max(pw, abs(p.detach().double().sum().item() - want["sum"]) / max(1.0, abs(want["sum"])),
                 abs(p.detach().double().norm().item() - want["l2_norm"]) / max(1.0, want["l2_norm"]))
    worst["final_params"] = pw
    return worst


def main():
    ok = True
    for kind in ("kto", "kto_paired", "dpo", "sft"):
        worst = run(kind)
        bad = {k: v for k, v in worst.items() if v > 1e-4}
        ok &= not bad
        print(f"{kind:11s} max rel err {max(worst.values()):.2e}", "FAIL " + str(bad) if bad else "ok")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
