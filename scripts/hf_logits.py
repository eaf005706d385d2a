"""Load a Hugging Face model folder with `transformers` and print its logits for given token ids as JSON.

Used by `crates/prospect/tests/transformers_roundtrip.rs` to prove that the folders Prospect saves load in
`transformers` (`AutoModelForCausalLM.from_pretrained`) and compute the same logits as Prospect.

    python scripts/hf_logits.py MODEL_DIR '[[1, 2, 3]]'

Pins: torch==2.15.0, transformers==5.24.0 (see scripts/requirements-ref.txt).
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    model_dir, ids_json = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    AutoTokenizer.from_pretrained(model_dir)  # the tokenizer files must load too
    ids = torch.tensor(json.loads(ids_json), dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    json.dump({"class": type(model).__name__, "logits": logits.tolist()}, sys.stdout)


if __name__ == "__main__":
    main()
