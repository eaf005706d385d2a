"""Load a base model plus a PEFT (LoRA) adapter folder and print its logits (or reward scores) for given token ids
as JSON.

Used to prove that the adapters Prospect saves load in PEFT (`PeftModel.from_pretrained`) on top of the base model
and compute the same logits as Prospect, and (with `--merged-out`) that PEFT's own merge matches Prospect's.

    python scripts/peft_logits.py BASE_DIR ADAPTER_DIR '[[1, 2, 3]]'
        -> {"class": "PeftModelForCausalLM", "base_class": "LlamaForCausalLM", "logits": [[[...]]]}
    python scripts/peft_logits.py BASE_DIR ADAPTER_DIR '[[1, 2, 3]]' --merged-out DIR
        also merge_and_unload() and save_pretrained(DIR) (safetensors) plus the tokenizer of BASE_DIR; the logits
        printed are still those of the unmerged PeftModel, and "merged_logits" are the merged model's.
    python scripts/peft_logits.py BASE_DIR ADAPTER_DIR '[[1, 2, 3, 0], [4, 5, 0, 0]]' --seq-cls
        base loaded with AutoModelForSequenceClassification(num_labels=1), adapter of task_type SEQ_CLS (score head
        in modules_to_save); right-padded ids, attention_mask = ids != pad_token_id (as scripts/hf_scores.py);
        prints {"class", "base_class", "num_labels", "scores": [...]}.

The adapter's own base_model_name_or_path is ignored: the base always comes from BASE_DIR.
Pins: torch==2.15.0, transformers==5.24.0, peft==0.21.2 (see scripts/requirements-ref.txt).
"""

import argparse
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_dir")
    ap.add_argument("adapter_dir")
    ap.add_argument("ids_json")
    ap.add_argument("--merged-out", metavar="DIR", help="merge_and_unload() and save the merged model + tokenizer here")
    ap.add_argument("--seq-cls", action="store_true",
                    help="AutoModelForSequenceClassification (num_labels=1) base and a SEQ_CLS adapter; print scores")
    args = ap.parse_args()

    torch.manual_seed(0)
    if args.seq_cls:
        base = AutoModelForSequenceClassification.from_pretrained(args.base_dir, num_labels=1, dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(args.base_dir, dtype=torch.float32)
    base_class = type(base).__name__
    tokenizer = AutoTokenizer.from_pretrained(args.base_dir)  # the tokenizer files must load too
    model = PeftModel.from_pretrained(base, args.adapter_dir)
    model.eval()
    ids = torch.tensor(json.loads(args.ids_json), dtype=torch.long)

    out = {"class": type(model).__name__, "base_class": base_class}
    with torch.no_grad():
        if args.seq_cls:
            pad = model.config.pad_token_id
            assert pad is not None, "the sequence-classification base needs pad_token_id to find the last token"
            attention_mask = (ids != pad).long()
            out["num_labels"] = model.config.num_labels
            out["scores"] = model(input_ids=ids, attention_mask=attention_mask).logits.squeeze(-1).tolist()
        else:
            out["logits"] = model(input_ids=ids).logits.tolist()

    if args.merged_out:
        merged = model.merge_and_unload()
        merged.eval()
        merged.save_pretrained(args.merged_out, safe_serialization=True)
        tokenizer.save_pretrained(args.merged_out)
        with torch.no_grad():
            if args.seq_cls:
                out["merged_scores"] = merged(input_ids=ids, attention_mask=attention_mask).logits.squeeze(-1).tolist()
            else:
                out["merged_logits"] = merged(input_ids=ids).logits.tolist()
        out["merged_class"] = type(merged).__name__
        out["merged_out"] = args.merged_out

    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
