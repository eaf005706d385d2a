"""The TRL side of scripts/bench_vs_trl.sh: KTOTrainer (TRL 1.16) on CPU, float32, with the settings of
the Prospect config the script writes. TRL's defaults otherwise (its threads: torch's default).

    python trl_kto.py MODEL_DIR DATA.jsonl OUT_DIR [--device cuda] [--max-length N] [--max-steps N] [--lr X]

`--tuned` turns off gradient checkpointing (on by default in TRL 1.16) and precomputes the reference
log-probs. `--device cuda` runs it on the GPU in float32 (scripts/gpu_check.sh); the other flags override the job's
settings for that check.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import json  # noqa: E402

from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import KTOConfig, KTOTrainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--tuned", action="store_true",
                    help="TRL tuned for speed: gradient_checkpointing=False, precompute_ref_log_probs=True")
    a = ap.parse_args()
    model, data, out = a.model, a.data, a.out
    rows = [json.loads(line) for line in open(data)]
    args = KTOConfig(
        output_dir=out,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=1,
        learning_rate=a.lr,
        max_steps=a.max_steps,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_length=a.max_length,
        train_sampling_strategy="sequential",
        use_cpu=a.device == "cpu",
        bf16=False,
        fp16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=42,
        **({"gradient_checkpointing": False, "precompute_ref_log_probs": True} if a.tuned else {}),
    )
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model))
    trainer.train()
    with open(os.path.join(out, "log_history.jsonl"), "w") as f:
        for e in trainer.state.log_history:
            f.write(json.dumps(e) + "\n")


if __name__ == "__main__":
    main()
