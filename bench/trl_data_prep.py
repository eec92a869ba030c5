"""TRL SFTTrainer dataset preparation speed on alpaca_en_demo.json (for bench/RESULTS.md).

Run with a Python that has TRL (see trl_side_by_side.py):
    /tmp/trlvenv/bin/python bench/trl_data_prep.py MODEL_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"


def main() -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    mdir = sys.argv[1]
    rows = json.loads(Path("/work/shared/data/alpaca_en_demo.json").read_text())
    conv = [{"messages": [{"role": "user", "content": r["instruction"] + ("\n" + r["input"] if r["input"] else "")},
                          {"role": "assistant", "content": r["output"]}]} for r in rows]
    tok = AutoTokenizer.from_pretrained(mdir)
    model = AutoModelForCausalLM.from_pretrained(mdir)
    for _ in range(2):
        ds = Dataset.from_list(conv)
        t = time.perf_counter()
        SFTTrainer(model=model, processing_class=tok, train_dataset=ds,
                   args=SFTConfig(output_dir="/tmp/trlprep/out", assistant_only_loss=False, report_to=[],
                                  max_length=2048, bf16=False))
        dt = time.perf_counter() - t
        print(f"TRL SFTTrainer dataset preparation, alpaca {len(conv)} rows: {dt:.2f} s, {len(conv) / dt:.0f} conv/s")


if __name__ == "__main__":
    main()
