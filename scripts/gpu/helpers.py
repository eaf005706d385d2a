"""Helpers of scripts/gpu_check.sh, one subcommand each (Python 3 with torch, on the GPU machine).

    python helpers.py peak                      # measured bf16 matmul peak of GPU 0, TFLOP/s
    python helpers.py rows OUT.jsonl TOKENIZER_DIR N LENGTH   # N unpaired KTO rows of LENGTH tokens each
    python helpers.py compare A/metrics.jsonl B/metrics.jsonl KEYS TOL [--relative]
    python helpers.py flops MODEL_DIR           # parameters of a Llama-family config (embedding excluded)

`compare` prints a JSON object {ok, worst: {key: max difference}, steps} and exits 1 when a value differs by
more than TOL (absolute, or relative to max(1, |a|) with --relative) or is not finite.
"""

import json
import math
import sys


def peak() -> None:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 50
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    print(f"{2 * n**3 * reps / seconds / 1e12:.1f}")


def rows(out: str, tokenizer_dir: str, count: int, length: int) -> None:
    """Rows whose prompt + completion is `length` tokens (half each), alternating labels, from a fixed
    word list: the throughput job needs full-length rows, not meaningful text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = "the model answers a question about rivers mountains numbers and the weather in a calm voice".split()
    text = " ".join(words[i % len(words)] for i in range(4 * length))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    half = length // 2
    with open(out, "w") as f:
        for i in range(count):
            start = (7 * i) % (len(ids) - length)
            prompt = tok.decode(ids[start:start + half])
            completion = tok.decode(ids[start + half:start + length - 4])
            f.write(json.dumps({"prompt": prompt, "completion": " " + completion, "label": i % 2 == 0}) + "\n")


def compare(a: str, b: str, keys: str, tol: float, relative: bool) -> None:
    ra = [json.loads(x) for x in open(a)]
    rb = [json.loads(x) for x in open(b)]
    worst, ok = {}, len(ra) == len(rb) and len(ra) > 0
    for x, y in zip(ra, rb):
        for k in keys.split(","):
            u, v = float(x[k]), float(y[k])
            if not (math.isfinite(u) and math.isfinite(v)):
                ok = False
                worst[k] = float("inf")
                continue
            d = abs(u - v) / (max(1.0, abs(u)) if relative else 1.0)
            worst[k] = max(worst.get(k, 0.0), d)
            ok = ok and d <= tol
    print(json.dumps({"ok": ok, "worst": worst, "steps": [len(ra), len(rb)]}))
    sys.exit(0 if ok else 1)


def flops(model_dir: str) -> None:
    c = json.load(open(f"{model_dir}/config.json"))
    d, f, l = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    h, g = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    e = d // h
    per_layer = d * h * e + 2 * d * g * e + h * e * d + 3 * d * f
    print(per_layer * l + c["vocab_size"] * d)  # the LM head's product counts; the embedding lookup does not


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "peak":
        peak()
    elif cmd == "rows":
        rows(args[0], args[1], int(args[2]), int(args[3]))
    elif cmd == "compare":
        compare(args[0], args[1], args[2], float(args[3]), "--relative" in args)
    elif cmd == "flops":
        flops(args[0])
    else:
        sys.exit(f"unknown command {cmd}")
