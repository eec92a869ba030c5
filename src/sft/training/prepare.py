"""THE setup of every stepping command: ``prepare()`` is what `sft train`, `sft bench` and
`sft lr-find` (and `sft sweep`, through train) call, so threads, seeds, data, precision, model
loading, device placement and compile cannot drift between them.

    prepare()            threads and seeds; data (each node's first process tokenizes first) and its
                         plan of steps; the model in the training dtype; ready_for_training
    prepare_data()       tokenized data (validated before any weights load) and the plan of steps
    ready_for_training() the model as training needs it (full or LoRA, frozen embeddings,
                         checkpointing, NEFTune, compile) on the runtime's device, with its optimizer
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sft.config import Config
from sft.data.batching import Step, plan_steps
from sft.data.types import Example
from sft.errors import SftError
from sft.lm.attention import use_padding_free, use_varlen
from sft.lm.compiled import compile_regions
from sft.lm.loss import unwrap
from sft.models import load as models
from sft.models import quantize
from sft.runtime import Runtime
from sft.training.optim import make_optimizer
from sft.training.plan import use_checkpointing
from sft.training.precision import to_train_dtype, train_dtype, use_compile

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from sft.data.report import Dataset


@dataclass
class TrainData:
    tokenizer: PreTrainedTokenizerBase
    data: Dataset  # examples, template, report
    plan: Sequence[Step]  # optimizer steps -> micro-batches -> rows -> example indices (batching.StepPlan)
    pad_id: int  # fills padding positions (masked, never trained; never an end-of-turn token)


def prepare_data(cfg: Config, max_steps: int | None, rt: Runtime) -> TrainData:
    """Validate, tokenize and mask the training data (before any weights load) and plan the steps."""
    from sft.data.chat import stop_token_ids
    from sft.data.pipeline import build_dataset, lint_dataset
    from sft.data.store import example_lengths
    from sft.models.save import pick_pad_id

    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code, revision=cfg.revision)
    data = build_dataset(cfg, tokenizer, "train")
    if not data.examples:
        raise SftError("data.train: no usable training examples; run `sft data check CONFIG` to see why")
    for warning in lint_dataset(data, tokenizer):
        print(f"warning: {warning}", file=sys.stderr)
    # a step holds grad_accum micro-batches per process (global batch x world)
    plan = plan_steps(
        example_lengths(data.examples), cfg.train.batch_size, cfg.train.grad_accum * rt.world, cfg.data.packing,
        cfg.data.max_length, cfg.train.epochs, max_steps, cfg.train.seed,
    )
    return TrainData(tokenizer, data, plan, pick_pad_id(tokenizer, stop_token_ids(tokenizer, data.template)))


@dataclass
class Prepared:
    """What a stepping command steps: ``prepare_data``'s data, the model ready for ``train_step``
    (on ``rt.device``, in the training dtype) and its optimizer."""

    tokenizer: PreTrainedTokenizerBase
    data: Dataset
    plan: Sequence[Step]
    pad_id: int
    model: Any
    optimizer: torch.optim.Optimizer
    eval_examples: Sequence[Example] = field(default_factory=list)


def seed_and_threads(cfg: Config) -> None:
    """``train.threads`` and ``train.seed`` (torch's and Python's generators) for this process."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)


def prepare(
    cfg: Config, rt: Runtime, max_steps: int | None, eval_split: str | None = None,
    before_training: Callable[[Any, TrainData], None] | None = None, long_run: bool = False,
) -> Prepared:
    """The one setup of train, bench and lr-find: threads and seeds, the data and its plan
    (``max_steps`` steps at most; ``eval_split`` "eval" or "dev" also builds those held-out
    examples), the model loaded in the training dtype and made ready for training on ``rt.device``.

    ``long_run``: decide ``train.compile: auto`` as for a long run (`sft bench` times a few steady
    steps of a run that would be longer). ``before_training(model, data)`` runs on the loaded model before it is adapted for training
    (``sft train``: put an --overwrite run aside, evaluate the starting model).
    """
    from sft.data.pipeline import build_dataset

    seed_and_threads(cfg)
    with rt.rank_zero_first(per_node=True):  # each node's first process tokenizes and fills its cache
        data = prepare_data(cfg, max_steps, rt)  # data: validated before any weights load
        eval_examples = build_dataset(cfg, data.tokenizer, eval_split).examples if eval_split else []
    quantize.check(cfg, rt.world)  # qlora: bitsandbytes installed, one process
    nf4 = quantize.bnb_config(cfg, train_dtype(cfg)) if cfg.train.method == "qlora" else None
    model = models.load_model(cfg.model, train_dtype(cfg), cfg.trust_remote_code, revision=cfg.revision,
                              quantization=nf4)  # bf16: pure bf16; qlora: NF4 linear layers
    if before_training is not None:
        before_training(model, data)
    model, optimizer = ready_for_training(cfg, model, rt, steps=None if long_run else len(data.plan))
    return Prepared(data.tokenizer, data.data, data.plan, data.pad_id, model, optimizer, eval_examples)


def ready_for_training(
    cfg: Config, model: Any, rt: Runtime, steps: int | None = None
) -> tuple[Any, torch.optim.Optimizer]:
    """The loaded model adapted for training (``prepare_model``, NEFTune, compile) and its AdamW.
    ``steps``: the run's optimizer steps (``train.compile: auto`` compiles only long runs; None: long)."""
    if cfg.train.method != "qlora":  # a 4-bit model loads in the training dtype and cannot be cast
        model = to_train_dtype(model, cfg)
    model = prepare_model(cfg, model).to(rt.device)  # bf16: LoRA adapters stay fp32
    model.train()
    if use_padding_free(cfg, rt.device):
        use_varlen(unwrap(model))
    if cfg.train.neftune_alpha:
        add_neftune(model, cfg.train.neftune_alpha)
    optimizer = make_optimizer(model, cfg.train)
    if use_compile(cfg, rt, steps):  # each decoder block in place: parameter names (and checkpoints) stay the same
        compile_regions(model)
    return model, optimizer


def prepare_model(cfg: Config, model: Any) -> Any:
    """Apply train.method (full | lora | qlora), embedding freezing and gradient checkpointing."""
    if cfg.train.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(False)
    if cfg.train.method in ("lora", "qlora"):  # qlora: the same adapters on NF4 linear layers
        with models.quiet_peft(), quantize.quiet_bitsandbytes():  # known warnings from inside peft and bnb
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=cfg.lora.r,
                    lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # PEFT annotates int, accepts float
                    lora_dropout=cfg.lora.dropout,
                    target_modules=cfg.lora.target_modules,
                    task_type="CAUSAL_LM",
                ),
            )
            if cfg.train.method == "qlora" and cfg.lora.init == "loftq":  # adapters absorb NF4's error
                src = models.resolve(cfg.model, cfg.revision, trust_remote_code=cfg.trust_remote_code)
                quantize.loftq(model, models.model_dir(src))
    if use_checkpointing(cfg, model.config.to_dict()):  # auto: when the plan says it is needed
        # transformers 5.x renamed it activation_checkpointing_enable; the old name warns
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        if cfg.train.method in ("lora", "qlora"):
            model.enable_input_require_grads()
    return model


def add_neftune(model: Any, alpha: float) -> Any:
    """NEFTune: uniform noise of scale alpha / sqrt(L * d) on input embeddings while training."""

    def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if module.training:
            dims = output.shape[-2] * output.shape[-1]
            mag = alpha / math.sqrt(dims)
            output = output + torch.zeros_like(output).uniform_(-mag, mag)
        return output

    return model.get_input_embeddings().register_forward_hook(hook)
