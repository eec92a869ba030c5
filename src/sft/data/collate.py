"""The only place lists become tensors: packed rows and padded batches.

Labels stay aligned with input_ids (the loss shifts). Every example's first label is set to
IGNORE: in a packed row, position ``start_k - 1`` (the last token of example k-1) would otherwise
be trained to predict example k's first token, a target that crosses a document boundary. In an
unpacked row position 0 is never a target, so this changes nothing there.

``shape=(rows, width)`` gives every micro-batch the same tensor shape ``[rows, width]`` (compiled
training: a new shape would recompile the graph): missing rows are all padding, and padding is
built exactly as for a shorter row, so the loss and its gradients do not change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sft.data.types import IGNORE, Example
from sft.errors import SftError


def collate_packed(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Concatenate examples into one row ``[1, total]``: input_ids, labels, position_ids.

    position_ids restart at 0 per example and there is NO attention_mask: transformers then builds
    a block-diagonal causal mask from position_ids (sdpa/eager) or uses varlen flash-attention.
    The model must run without a KV cache (``use_cache=False``), else transformers ignores packing.
    """
    if not examples:
        raise SftError("collate: no examples to pack; check that the data is not empty")
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        if len(ex.labels) != len(ex.input_ids) or not ex.input_ids:
            raise SftError(f"{ex.source}:{ex.line}: labels and input_ids differ in length or are empty")
        ids.extend(ex.input_ids)
        labels.append(IGNORE)  # never predicted from the previous example
        labels.extend(ex.labels[1:])
        positions.extend(range(len(ex.input_ids)))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }


def _static_width(longest: int, shape: tuple[int, int] | None, n_rows: int) -> int:
    if shape is None:
        return longest
    if longest > shape[1] or n_rows > shape[0]:
        raise SftError(f"collate: {n_rows} rows of up to {longest} tokens do not fit the static shape {shape}")
    return shape[1]


def collate_padded(
    examples: Sequence[Example], pad_id: int, shape: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest (or to ``shape``): input_ids, labels, attention_mask, position_ids, each ``[B, L]``.

    Padding is found by position, never by token id (pad may equal eos): its label is IGNORE and
    its attention_mask 0. position_ids count on through the padding so it never looks packed.
    A padding row (``shape`` with fewer examples) keeps its first position unmasked: a row that
    attends to nothing would give NaN attention.
    """
    if not examples:
        raise SftError("collate: no examples to batch; check that the data is not empty")
    width = _static_width(max(len(ex.input_ids) for ex in examples), shape, len(examples))
    ids, labels, mask = [], [], []
    for ex in examples:
        n = len(ex.input_ids)
        if len(ex.labels) != n or n == 0:
            raise SftError(f"{ex.source}:{ex.line}: labels and input_ids differ in length or are empty")
        pad = width - n
        ids.append([*ex.input_ids, *([pad_id] * pad)])
        labels.append([IGNORE, *ex.labels[1:], *([IGNORE] * pad)])
        mask.append([1] * n + [0] * pad)
    for _ in range((shape[0] if shape else 0) - len(examples)):
        ids.append([pad_id] * width)
        labels.append([IGNORE] * width)
        mask.append([1] + [0] * (width - 1))
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "position_ids": torch.arange(width, dtype=torch.long).expand(len(ids), width).clone(),
    }


def collate_packed_rows(
    rows: Sequence[Sequence[Example]], pad_id: int, shape: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Pack each row as ``collate_packed`` does and stack the rows into ``[B, L]``.

    Bins stay separate rows (attention cost B x L^2, not (B x L)^2). A shorter row is
    right-padded with a segment of its own whose positions restart at 0 and whose labels are
    IGNORE, so padding is one more "document" that no real token attends to.

    >>> a, b, c = Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [4, 5]), Example([6], [6])
    >>> out = collate_packed_rows([[a, b], [c]], pad_id=0)
    >>> out["input_ids"].tolist(), out["position_ids"].tolist()
    ([[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]], [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]])
    >>> out["labels"].tolist()
    [[-100, 2, 3, -100, 5], [-100, -100, -100, -100, -100]]
    >>> static = collate_packed_rows([[c]], pad_id=0, shape=(2, 3))
    >>> static["input_ids"].tolist(), static["position_ids"].tolist()
    ([[6, 0, 0], [0, 0, 0]], [[0, 0, 1], [0, 1, 2]])
    """
    if not rows or not all(rows):
        raise SftError("collate: an empty row of examples; check that the data is not empty")
    packed = [collate_packed(r) for r in rows]
    width = _static_width(max(p["input_ids"].shape[1] for p in packed), shape, len(packed))
    empty = torch.zeros((1, 0), dtype=torch.long)
    packed += [{"input_ids": empty, "labels": empty, "position_ids": empty}] * ((shape[0] if shape else 0) - len(rows))
    out: dict[str, list[torch.Tensor]] = {"input_ids": [], "labels": [], "position_ids": []}
    for p in packed:
        pad = width - p["input_ids"].shape[1]
        fill = {"input_ids": torch.full((1, pad), pad_id), "labels": torch.full((1, pad), IGNORE),
                "position_ids": torch.arange(pad)[None]}
        for k in out:
            out[k].append(torch.cat([p[k], fill[k].to(torch.long)], dim=1))
    return {k: torch.cat(v, dim=0) for k, v in out.items()}
