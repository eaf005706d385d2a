"""Load a reward-model folder with `transformers` (`AutoModelForSequenceClassification`) and print its scores
for right-padded token ids as JSON.

Used by `crates/prospect/tests/transformers_roundtrip.rs` to prove that the reward models Prospect saves load
as sequence classifiers with one label and score as Prospect does (HF reads the last non-pad token).

    python scripts/hf_scores.py MODEL_DIR '[[1, 2, 3, 0], [4, 5, 0, 0]]'

Pins: torch==2.15.0, transformers==5.24.0 (see scripts/requirements-ref.txt).
"""

import json
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main() -> None:
    model_dir, ids_json = sys.argv[1], sys.argv[2]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    AutoTokenizer.from_pretrained(model_dir)  # the tokenizer files must load too
    ids = torch.tensor(json.loads(ids_json), dtype=torch.long)
    attention_mask = (ids != model.config.pad_token_id).long()
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=attention_mask).logits.squeeze(-1)
    json.dump({"class": type(model).__name__, "num_labels": model.config.num_labels, "scores": scores.tolist()}, sys.stdout)


if __name__ == "__main__":
    main()
