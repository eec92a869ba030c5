"""Typed run configuration: YAML file + ``--section.key=value`` overrides, strictly validated.

Every choice is a typed literal; unknown keys are errors with a "did you mean". The resolved
config is saved next to every run (``output_dir/config.yaml``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from sft.errors import SftError

Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]
TrainOn = Literal["assistant", "last_assistant", "all"]
Metric = Literal["exact", "contains", "regex", "json", "constraints", "tool_call"]
Category = Literal["harmful", "benign"]
QualityKind = Literal[
    "near_duplicates", "contamination", "empty_responses", "truncated_responses", "boilerplate", "placeholders",
    "length_outliers",
]
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]  # train.report_to (sft.reporting.trackers)
RENAMED = {"train.tensorboard": "train.report_to: [tensorboard]"}  # old key -> what to write instead
QUANT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # lora.quant_blocksize: what bitsandbytes' quantize_4bit accepts


@dataclass
class SourceConfig:
    """One data source: a file or folder of files, a save_to_disk folder, Arrow shards, or a hub
    dataset ``org/name`` (see ``sft.data.hub``)."""

    path: str
    format: Format = "auto"
    weight: float | None = None  # sample this source's rows with this relative weight (with replacement)
    limit: int | None = None  # take at most this many rows from it
    metric: Metric | None = None  # eval only: overrides eval.metric for rows of this source
    name: str | None = None  # label in reports; defaults to the file name
    category: Category | None = None  # safety eval: every row of this source is harmful or benign
    subset: str | None = None  # hub dataset: the configuration (load_dataset's name)
    split: str | None = None  # hub dataset or DatasetDict folder: the split (default train)
    revision: str | None = None  # hub dataset: branch, tag or commit
    streaming: bool = False  # hub dataset: read rows as they download, never storing the whole set
    messages_field: str | None = None  # column mapping: the column holding the messages
    prompt_field: str | None = None  # ... the prompt (with completion_field: prompt_completion)
    completion_field: str | None = None
    text_field: str | None = None  # ... the plain text (format text)


@dataclass
class QualityConfig:
    """``data.quality``: what ``sft data check`` looks for and what training drops (sft.data.quality)."""

    drop: list[QualityKind] = field(default_factory=list)  # kinds of problem rows removed before training
    near_duplicate_threshold: float = 0.8  # Jaccard similarity of word 3-shingles at or above which rows are near-duplicates
    boilerplate: list[str] = field(default_factory=list)  # phrases added to the built-in boilerplate list


@dataclass
class SelectConfig:
    """``data.select``: keep rows by the scores of ``sft data score`` (sft.data.select)."""

    by: Literal["ifd", "random"] = "ifd"  # ifd: the highest IFD first (Cherry LLM); random: a seeded draw
    keep: float | None = None  # a fraction (< 1) or a count (a whole number >= 1) of rows; null: all that pass
    drop_ifd_above: float | None = None  # drop rows whose reply IFD is above this (1.0: the prompt does not help)
    min_eot_prob: float | None = None  # drop rows whose reply ends with end-of-turn probability below this
    scorer: str | None = None  # the model that scored (default: model); names the scores cache
    scores: str | None = None  # a scores.jsonl from `sft data score --out` instead of the cache


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    format: Format = "auto"
    template: str = "auto"  # auto | chatml | gemma | llama3 | path/to/template.jinja
    train_on: TrainOn = "assistant"
    # which assistant turns show their reasoning: keep_last (each trained turn its own; history
    # without, as at inference), keep_all, drop
    reasoning: Literal["keep_last", "keep_all", "drop"] = "keep_last"
    # keyword arguments of the chat template (enable_thinking: false, reasoning_effort: high, ...):
    # written into the template as defaults, so final/'s saved template renders the same
    template_kwargs: dict[str, str | bool | int | float | None] = field(default_factory=dict)
    max_length: int = 2048
    truncation: Literal["drop", "truncate"] = "drop"
    packing: bool = True
    dedup: bool = False
    on_invalid: Literal["error", "skip"] = "error"
    system: str | None = None  # system prompt added to conversations that have none
    cache_dir: str | None = None  # tokenized-data cache; default ~/.cache/sft/data
    num_proc: int | Literal["auto"] = "auto"  # tokenizing worker processes; auto = usable cores
    quality: QualityConfig = field(default_factory=QualityConfig)
    select: SelectConfig | None = None  # keep rows by model scores (sft data score); null: keep all


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    # train.method: qlora: weights per NF4 block, each with its own scale (bitsandbytes' default 64; 32 loses less)
    quant_blocksize: int = 32
    double_quant: bool = True  # qlora: the blocks' scales in 8 bits too (0.53 bytes a weight instead of 0.625)
    # qlora: loftq starts the adapters at the rank-r SVD of what NF4 lost (sft.models.quantize.loftq)
    init: Literal["default", "loftq"] = "default"


@dataclass
class TrainConfig:
    # qlora: LoRA on a base whose linear layers are 4-bit NF4 (bitsandbytes; sft.training.qlora)
    method: Literal["full", "lora", "qlora"] = "full"
    lr: float = 2e-5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = 0.03  # a fraction of the steps if < 1, else a number of steps
    min_lr_ratio: float = 0.0  # cosine/linear decay to lr * min_lr_ratio
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 4  # sequences (or packed bins) per micro-batch
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the hardware has it
    # how bf16 weights follow their fp32 master (precision bf16), and final/ is cast to bf16:
    # stochastic (unbiased; sub-step updates survive) or nearest (sft.lm.rounding, bench/bf16_quality.py)
    bf16_rounding: Literal["stochastic", "nearest"] = "stochastic"
    save_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # final/'s dtype; auto: the model's own (bf16 for the packaged models)
    gradient_checkpointing: bool | Literal["auto"] = False  # auto: on when `sft plan` says the run needs it
    # packed rows: varlen (each document attends to itself only: cu_seqlens on a GPU, per-document
    # flash kernels on a CPU; sft.lm.attention) or sdpa (a dense block-diagonal mask); auto: varlen
    attention: Literal["auto", "sdpa", "varlen"] = "auto"
    neftune_alpha: float | None = None
    freeze_embeddings: bool = False
    seed: int = 42
    save_every: int | None = None
    keep_checkpoints: int = 2
    on_nan: Literal["stop", "skip"] = "stop"
    log_every: int = 1
    report_to: list[Tracker] = field(default_factory=list)  # any of tensorboard, wandb, mlflow, trackio
    # each decoder block and the loss compiled with static shapes (sft.lm.compiled); auto: on for
    # runs of >= 50 steps on CUDA (not with varlen attention) or in bf16 on a CPU (sft.training.precision.use_compile)
    compile: bool | Literal["auto"] = "auto"
    threads: int | None = None
    # under torchrun: ddp (a whole model per process) | fsdp (FSDP2, sharded per decoder layer);
    # auto: ddp below sft.training.distributed.FSDP_FROM_PARAMS (1B) parameters, fsdp above
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    # adamw: torch's (sft.training.optim); adamw_8bit / paged_adamw_8bit: bitsandbytes' 8-bit moments
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    offload: bool = False  # FSDP2 on CUDA: parameters, gradients and optimizer state live in CPU RAM


@dataclass
class RefusalConfig:
    """``eval.refusal``: the refusal detector of refusal_rate / over_refusal_rate (sft.evaluation.safety)."""

    phrases: list[str] = field(default_factory=list)  # added to the built-in phrase list
    regex: str | None = None  # a reply this matches (re.search, case-insensitive) is a refusal too
    builtin: bool = True  # false: only phrases and regex count


@dataclass
class EvalConfig:
    data: list[SourceConfig] = field(default_factory=list)
    split: float = 0.0
    metric: Metric = "contains"
    max_new_tokens: int = 128
    every: int | None = None
    before_after: bool = False
    reference: str | None = None  # a UTF-8 text file; default: the shipped stdlib-prose-v1 snapshot
    reference_tokens: int = 16384  # reference tokens scored for forgetting (128 windows spread over the text)
    batch_size: int = 8
    max_examples: int | None = None  # cap on conversations used for generation metrics
    samples: int = 5
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    dev: list[SourceConfig] = field(default_factory=list)  # data for choices: eval.every, early stopping, sweep
    dev_split: float = 0.0  # share of the training rows held out as dev (after eval.split, before weighting)
    before_after_split: Literal["eval", "dev"] = "eval"  # what before/after.json score (sft sweep trials: dev)
    refusal: RefusalConfig = field(default_factory=RefusalConfig)

    @property
    def has_test(self) -> bool:
        """Test rows exist: ``eval.data`` or an ``eval.split`` of the training rows."""
        return bool(self.data) or self.split > 0

    @property
    def has_dev(self) -> bool:
        """Dev rows exist: ``eval.dev`` or an ``eval.dev_split`` of the training rows."""
        return bool(self.dev) or self.dev_split > 0


@dataclass
class SweepConfig:
    grid: dict[str, list[Any]] = field(default_factory=dict)
    objective: str = "task_accuracy"
    max_forgetting: float | None = None  # max relative rise of reference perplexity, e.g. 0.10
    prune: bool = True
    seeds: int = 1  # repeat each setting with train.seed, +1, ...; choose on the mean, report the spread


@dataclass
class Config:
    model: str = "smollm2-135m-instruct"
    revision: str | None = None  # for a hub model ID: branch, tag or commit
    output_dir: str = "runs/default"
    trust_remote_code: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    base_dir: str = field(default=".", metadata={"internal": True})  # relative paths resolve here


# ---------------------------------------------------------------------------------------------
# dict -> dataclass, with errors that name the key and the fix


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if value is None and origin not in (Union, types.UnionType) and tp is not type(None):
        raise SftError(f"{where}: has no value (a blank key in YAML is null); give a value or remove the key")
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(inner) == 1:  # `SelectConfig | None`: the section's own errors
            return _coerce(value, inner[0], where)
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except SftError as e:
                errors.append(str(e))
        raise SftError(f"{where}: {value!r} is not a valid value; expected {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise SftError(f"{where}: expected null")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        fix = f"did you mean {hint[0]!r}? " if hint else ""
        raise SftError(f"{where}: {value!r} is not allowed; {fix}use one of {', '.join(map(str, choices))}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            if dataclasses.is_dataclass(item_tp) or item_tp is str or typing.get_origin(item_tp) is Literal:
                value = [value]  # a single source may be written without a list
            else:
                raise SftError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SftError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if tp is SourceConfig and isinstance(value, str):
            value = {"path": value}
        if not isinstance(value, dict):
            raise SftError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SftError(f"{where}: {value!r} is not true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SftError(f"{where}: {value!r} is not an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise SftError(f"{where}: {value!r} is not a number")
        if not math.isfinite(number):
            raise SftError(f"{where}: {value!r} is not a finite number; give a number such as 0.5")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise SftError(f"{where}: {value!r} is not a string")
    raise SftError(f"{where}: unsupported type {tp}")


def from_dict(cls: Any, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys are errors with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            if f"{where}.{key}" in RENAMED:
                raise SftError(f"{where}.{key}: replaced; write {RENAMED[f'{where}.{key}']}")
            hint = difflib.get_close_matches(str(key), names, n=1)
            fix = f"did you mean {hint[0]!r}?" if hint else f"known keys: {', '.join(names)}"
            prefix = f"{where}." if where != "config" else ""
            raise SftError(f"{prefix}{key}: unknown key; {fix}")
        sub = f"{where}.{key}" if where != "config" else key
        kwargs[key] = _coerce(value, hints[key], sub)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise SftError(f"{where}: {e}; add the missing key") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out.pop("base_dir", None)
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``dotted == "a.b"``, creating mappings on the way.

    >>> d = {}; set_dotted(d, "train.lr", 0.1); d
    {'train': {'lr': 0.1}}
    """
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``--train.lr=1e-4`` (or ``train.lr=1e-4``) into a key and a YAML value.

    >>> parse_override("--train.lr=1e-4")
    ('train.lr', 0.0001)
    >>> parse_override("--data.packing=false")
    ('data.packing', False)
    """
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise SftError(f"{text}: overrides look like --section.key=value (e.g. --train.lr=1e-4)")
    key, raw = body.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, RecursionError):  # not YAML (e.g. an unclosed quote): the text itself
        value = raw
    if isinstance(value, str) and any(c in value.lower() for c in ".e"):
        with contextlib.suppress(ValueError):
            value = float(value)
    return key, value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    base = Path(".")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SftError(f"{p}: config file not found; pass the path of a YAML file")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise SftError(f"{p}{line}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
        except UnicodeDecodeError as e:
            raise SftError(f"{p}: byte 0x{e.object[e.start]:02x} at byte {e.start} is not UTF-8; "
                           "re-save the config as UTF-8") from None
        except RecursionError:
            raise SftError(f"{p}: nested too deeply to read; flatten the YAML") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SftError(f"{p}: the config must be a mapping of keys (model:, data:, train: ...)")
        data = loaded
        base = p.parent
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    cfg: Config = from_dict(Config, data)
    cfg.base_dir = str(base)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that span several keys."""
    # an empty path is Path("") == the working directory: never what was meant
    named = [("model", cfg.model, "smollm2-135m-instruct"), ("output_dir", cfg.output_dir, "runs/NAME"),
             ("data.template", cfg.data.template, "auto")]
    named += [(f"data.train[{i}].path", s.path, "data/train.jsonl") for i, s in enumerate(cfg.data.train)]
    named += [(f"eval.data[{i}].path", s.path, "data/eval.jsonl") for i, s in enumerate(cfg.eval.data)]
    named += [(f"eval.dev[{i}].path", s.path, "data/dev.jsonl") for i, s in enumerate(cfg.eval.dev)]
    for key, value, example in named:
        if not value.strip():
            raise SftError(f"{key}: is empty; give a value (e.g. {example}) or remove the key")
    if cfg.data.max_length < 16:
        raise SftError(f"data.max_length: {cfg.data.max_length} is too small; use at least 16")
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise SftError("train.batch_size and train.grad_accum must be at least 1")
    if not 0.0 <= cfg.eval.split < 1.0:
        raise SftError(f"eval.split: {cfg.eval.split} must be in [0, 1)")
    if not 0.0 <= cfg.eval.dev_split < 1.0 or cfg.eval.split + cfg.eval.dev_split >= 1.0:
        raise SftError(f"eval.dev_split: {cfg.eval.dev_split} must be in [0, 1) and leave training rows "
                       f"(eval.split + eval.dev_split = {cfg.eval.split + cfg.eval.dev_split:g} must be below 1)")
    if cfg.eval.before_after_split == "dev" and not (cfg.eval.dev or cfg.eval.dev_split):
        raise SftError("eval.before_after_split: dev, but there is no dev set; set eval.dev or eval.dev_split")
    if cfg.eval.reference_tokens < 128:
        raise SftError(f"eval.reference_tokens: {cfg.eval.reference_tokens} is below one window of 128 tokens; use 128 or more (default 16384)")
    if cfg.train.lr <= 0:
        raise SftError(f"train.lr: {cfg.train.lr} must be positive")
    sel = cfg.data.select
    if sel is not None and sel.keep is not None and (sel.keep <= 0 or (sel.keep >= 1 and not float(sel.keep).is_integer())):
        raise SftError(f"data.select.keep: {sel.keep} is neither a fraction in (0, 1) nor a whole number of rows; "
                       "use e.g. 0.1 (10% of the rows) or 500 (rows)")
    if sel is not None and sel.by == "random" and sel.keep is None:
        raise SftError("data.select.by: random needs data.select.keep (a fraction such as 0.1 or a number of rows)")
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        raise SftError("train.max_steps must be at least 1")
    t, e = cfg.train, cfg.eval
    # (key, value, smallest allowed, largest allowed): values outside crash or hang deep inside a run
    limits: list[tuple[str, float | None, float, float | None]] = [
        ("train.epochs", t.epochs, 1e-6, 1e4), ("train.max_steps", t.max_steps, 1, 10**7),
        ("train.warmup", t.warmup, 0, None), ("train.weight_decay", t.weight_decay, 0, None),
        ("train.max_grad_norm", t.max_grad_norm, 1e-12, None), ("train.save_every", t.save_every, 1, None),
        ("train.threads", t.threads, 1, None), ("lora.r", cfg.lora.r, 1, None), ("lora.dropout", cfg.lora.dropout, 0, 0.99),
        ("eval.batch_size", e.batch_size, 1, None), ("eval.max_new_tokens", e.max_new_tokens, 1, None),
        ("eval.every", e.every, 1, None), ("eval.max_examples", e.max_examples, 1, None), ("eval.samples", e.samples, 0, None),
    ]
    for name, number, low, high in limits:
        if number is not None and (number < low or (high is not None and number > high)):
            bounds = f"between {low} and {high}" if high is not None else f"of at least {low}"
            raise SftError(f"{name}: {number} is out of range; use a value {bounds}")
    if cfg.lora.quant_blocksize not in QUANT_BLOCKSIZES:
        raise SftError(f"lora.quant_blocksize: {cfg.lora.quant_blocksize} is not a block size bitsandbytes' NF4 "
                       f"supports; use one of {', '.join(map(str, QUANT_BLOCKSIZES))} (default 32)")
    if cfg.lora.init == "loftq" and t.method != "qlora":
        raise SftError(f"lora.init: loftq starts the adapters from a 4-bit base's quantization error; train.method: "
                       f"{t.method} has none. Use train.method: qlora, or lora.init: default")
    if not 0.0 < cfg.data.quality.near_duplicate_threshold <= 1.0:
        raise SftError(f"data.quality.near_duplicate_threshold: {cfg.data.quality.near_duplicate_threshold} "
                       "must be in (0, 1]; e.g. 0.8")


def cache_root() -> Path:
    """Where sft keeps converted models and tokenized data: ``$SFT_CACHE`` or ``~/.cache/sft``."""
    return Path(os.environ.get("SFT_CACHE", Path.home() / ".cache" / "sft"))


def resolve_path(cfg: Config, path: str) -> Path:
    """A data path from the config: absolute, relative to the working directory, or else
    relative to the config file's folder (so a config and its data can move together)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    beside = Path(cfg.base_dir) / p
    return beside if beside.exists() else p


def save_config(cfg: Config, path: Path) -> None:
    from sft.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
