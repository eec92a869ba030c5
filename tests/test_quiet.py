"""Quiet runs: `sft train` (LoRA, gradient checkpointing, eval.split), `sft eval` and
`sft export --to hf` on a tiny model raise no warning from another package (transformers 5's
renamed checkpointing API is used; the one FutureWarning peft raises from inside is hidden at its
call sites, sft.models.load.quiet_peft). The control shows the recorder catches the deprecated call."""

from __future__ import annotations

import json
import warnings

from sft.cli import main


def test_train_eval_export_raise_no_warnings(tiny_dir, data_file, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "model": str(tiny_dir), "output_dir": str(run),
        "data": {"train": [{"path": str(data_file)}], "template": "chatml", "max_length": 128,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"method": "lora", "max_steps": 2, "batch_size": 2, "gradient_checkpointing": True, "precision": "fp32"},
        "eval": {"split": 0.2, "before_after": False, "max_new_tokens": 4, "reference_tokens": 256},
    }))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["train", str(cfg)]) == 0
        assert main(["eval", str(cfg), "--model", str(run / "final"), "--out", str(tmp_path / "e.json")]) == 0
        assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert [f"{w.category.__name__}: {w.message} ({w.filename})" for w in seen] == []
    assert "Warning" not in capsys.readouterr().err

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    with warnings.catch_warnings(record=True) as control:
        warnings.simplefilter("always")
        assert not model.is_gradient_checkpointing  # the deprecated alias peft reads
    assert [w.category for w in control] == [FutureWarning]
