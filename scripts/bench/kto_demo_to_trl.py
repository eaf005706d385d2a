"""The first N rows of LLaMA-Factory's `kto_en_demo.json` (`messages` + `label`), written twice, unrendered:

- OUT.json: the rows as they are (a JSON array), which Prospect reads directly;
- OUT.jsonl: TRL's conversational unpaired layout, which KTOTrainer renders with the model's chat template:
  `prompt` = the messages before the last, `completion` = [the last message], `label`.

    python kto_demo_to_trl.py DATA.json OUT.json OUT.jsonl [--rows 32]
"""

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out_json")
    ap.add_argument("out_jsonl")
    ap.add_argument("--rows", type=int, default=32)
    a = ap.parse_args()
    rows = json.load(open(a.data))[: a.rows]
    json.dump(rows, open(a.out_json, "w"), ensure_ascii=False)
    with open(a.out_jsonl, "w") as f:
        for r in rows:
            msgs = r["messages"]
            assert msgs[-1]["role"] == "assistant", "the last message must be the completion"
            f.write(json.dumps({"prompt": msgs[:-1], "completion": msgs[-1:], "label": bool(r["label"])}) + "\n")


if __name__ == "__main__":
    main()
