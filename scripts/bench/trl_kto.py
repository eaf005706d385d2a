"""The TRL side of scripts/bench_vs_trl.sh: KTOTrainer (TRL 1.16) on CPU, float32, with the settings of
the Prospect config the script writes. TRL's defaults otherwise (its threads: torch's default).

    python trl_kto.py MODEL_DIR DATA.jsonl OUT_DIR
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json  # noqa: E402

from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import KTOConfig, KTOTrainer  # noqa: E402


def main() -> None:
    model, data, out = sys.argv[1:4]
    rows = [json.loads(line) for line in open(data)]
    args = KTOConfig(
        output_dir=out,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=1,
        learning_rate=5e-6,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_length=128,
        train_sampling_strategy="sequential",
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=42,
    )
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model))
    trainer.train()
    with open(os.path.join(out, "log_history.jsonl"), "w") as f:
        for e in trainer.state.log_history:
            f.write(json.dumps(e) + "\n")


if __name__ == "__main__":
    main()
