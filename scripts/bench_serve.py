#!/usr/bin/env python3
"""Throughput of `prospect serve` with and without batching (Python standard library only).

    python3 scripts/bench_serve.py --model target/smollm2/reference-f32 [--binary target/release/prospect]
                                   [--clients 8] [--max-tokens 64] [--repeats 3]

For each `--max-batch` setting (1, then the number of clients), it starts the server on a free port with
a throwaway SQLite database, and sends `--clients` requests at once. Each request is a different short
conversation, sampled at temperature 1 with a fixed seed and `max_tokens`. It does this `--repeats` times
and prints one JSON line per setting: the median wall time of a round, the completion tokens per round
and tokens per second.
"""
import argparse
import concurrent.futures
import json
import statistics
import subprocess
import tempfile
import time
import urllib.request

QUESTIONS = [
    "Give me three tips for sleeping better.",
    "What is the difference between a list and a tuple in Python?",
    "Why do we have leap years?",
    "Write a haiku about autumn rain.",
    "Explain what a hash table is.",
    "What causes the seasons on Earth?",
    "Suggest a name for a bakery.",
    "How do I politely decline a meeting?",
]


def post(base, body):
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def run(binary, model, max_batch, clients, max_tokens, repeats):
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [binary, "serve", "--model", model, "--db", f"sqlite://{tmp}/f.db", "--port", "0",
             "--max-batch", str(max_batch), "--batch-window-ms", "20"],
            stderr=subprocess.PIPE, text=True)
        try:
            line = server.stderr.readline()
            base = "http://" + line.split(" on http://")[1].split()[0]
            bodies = [{"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                       "temperature": 1.0, "seed": i, "max_tokens": max_tokens} for i in range(clients)]
            post(base, bodies[0])  # warm up
            walls, tokens = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                    answers = list(pool.map(lambda b: post(base, b), bodies))
                walls.append(time.perf_counter() - start)
                tokens.append(sum(a["usage"]["completion_tokens"] for a in answers))
            wall = statistics.median(walls)
            return {"max_batch": max_batch, "clients": clients, "median_wall_s": round(wall, 2),
                    "completion_tokens": tokens, "tokens_per_s": round(statistics.median(tokens) / wall, 1)}
        finally:
            server.kill()
            server.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--binary", default="target/release/prospect")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    for max_batch in (1, a.clients):
        print(json.dumps(run(a.binary, a.model, max_batch, a.clients, a.max_tokens, a.repeats)), flush=True)


if __name__ == "__main__":
    main()
