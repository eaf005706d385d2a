"""Convert the first N rows of LLaMA-Factory's `kto_en_demo.json` (conversational: `messages` + `label`) to
TRL's plain-text unpaired layout (`prompt`, `completion`, `label`), with the model's chat template applied.

Why: the benchmark of issue 6 feeds "conversational unpaired rows" to both TRL and Prospect. Prospect reads
conversational rows only once the data branch lands, so until then both sides get the *same* plain-text
rows, rendered here once, which keeps them comparable. The rendering is what TRL itself does for a
conversational prompt/completion pair: prompt = template(messages[:-1], add_generation_prompt=True),
completion = template(messages)[len(prompt):].

    python kto_demo_to_plain.py DATA.json MODEL_DIR OUT.jsonl [--rows 32]
"""

import argparse
import json

from transformers import AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=32)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = json.load(open(a.data))[: a.rows]
    with open(a.out, "w") as f:
        for r in rows:
            msgs = r["messages"]
            assert msgs[-1]["role"] == "assistant", "the last message must be the completion"
            prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(msgs, tokenize=False)
            assert full.startswith(prompt), "the template must render the prompt as a prefix"
            f.write(json.dumps({"prompt": prompt, "completion": full[len(prompt):], "label": bool(r["label"])}) + "\n")


if __name__ == "__main__":
    main()
