"""Collation: packed rows and padded batches; a packed example's logits equal its own forward pass."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_gemma, tiny_llama
from sft.data.collate import collate_packed, collate_padded
from sft.data.packing import best_fit_decreasing
from sft.data.types import IGNORE, Example

X = IGNORE


def test_collate_packed_exact():
    a = Example([1, 10, 11, 2], [X, X, 11, 2])
    b = Example([1, 20, 2], [1, 20, 2])  # train_on=all / text: its first label is a real token
    out = collate_packed([a, b])
    assert set(out) == {"input_ids", "labels", "position_ids"}  # no attention_mask
    assert out["input_ids"].tolist() == [[1, 10, 11, 2, 1, 20, 2]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    # b's first label is IGNORE: a's last token (2) must not be trained to predict b's first token
    assert out["labels"].tolist() == [[X, X, 11, 2, X, 20, 2]]


@pytest.mark.parametrize("seed", range(3))
def test_no_label_crosses_a_document_boundary(seed):
    rng = random.Random(seed)
    exs = [Example(ids := [rng.randint(3, 99) for _ in range(rng.randint(1, 30))], list(ids)) for _ in range(40)]
    for b in best_fit_decreasing([len(e) for e in exs], capacity=64):
        row = collate_packed([exs[i] for i in b])
        pos, labels = row["position_ids"][0].tolist(), row["labels"][0].tolist()
        assert len(pos) <= 64
        starts = [t for t, p in enumerate(pos) if p == 0]
        assert starts == [sum(len(exs[i]) for i in b[:k]) for k in range(len(b))]  # positions restart at 0
        # the loss uses labels[1:] as targets of positions[:-1]: a target at a document start would
        # be predicted from the previous document
        assert all(labels[s] == X for s in starts)
        assert [lab for lab in labels if lab != X] == [lab for i in b for lab in exs[i].labels[1:]]


def test_collate_padded_pad_equals_eos():
    # SmolLM2: pad == eos == 2. The trained eos stays trained; padding is found by position.
    a = Example([1, 10, 2], [X, 10, 2])
    b = Example([1, 2], [X, 2])
    out = collate_padded([a, b], pad_id=2)
    assert out["input_ids"].tolist() == [[1, 10, 2], [1, 2, 2]]
    assert out["labels"].tolist() == [[X, 10, 2], [X, 2, X]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert collate_padded([Example([5, 6], [5, 6])], pad_id=0)["labels"].tolist() == [[X, 6]]


def _examples(vocab: int, lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, list(ids)))
    return out


def _logits(model, **batch) -> torch.Tensor:
    with torch.no_grad():
        # use_cache=False is required: with a KV cache transformers ignores packed position_ids
        return model(**batch, use_cache=False).logits[0]


def _alone(model, ex: Example) -> torch.Tensor:
    return _logits(model, input_ids=torch.tensor([ex.input_ids]))


@pytest.fixture(scope="module")
def models():
    return {
        "llama": tiny_llama(49152),  # SmolLM2's vocabulary size
        "gemma": tiny_gemma(),  # sliding window 16: the examples below are longer than that
    }


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_packed_logits_equal_separate_forward(models, arch, attn):
    model = models[arch]
    model.set_attn_implementation(attn)
    vocab = model.config.vocab_size
    exs = _examples(vocab, [23, 9, 31])
    row = {k: v for k, v in collate_packed(exs).items() if k != "labels"}
    packed = _logits(model, **row)
    bounds = [0, 23, 32, 63]
    for k, ex in enumerate(exs):
        torch.testing.assert_close(packed[bounds[k] : bounds[k + 1]], _alone(model, ex), atol=1e-5, rtol=1e-5)

    # changing example 0's tokens changes only example 0's logits
    changed = [Example([(t + 1) % vocab for t in exs[0].input_ids], exs[0].labels), *exs[1:]]
    other = _logits(model, **{k: v for k, v in collate_packed(changed).items() if k != "labels"})
    assert not torch.allclose(other[:23], packed[:23], atol=1e-3)
    torch.testing.assert_close(other[23:], packed[23:], atol=1e-5, rtol=1e-5)

    # CONTROLS: the same row under a plain causal mask leaks between examples, so this test can fail
    leaky = [
        {"input_ids": row["input_ids"], "position_ids": torch.arange(63)[None]},  # positions not restarting
        {**row, "attention_mask": torch.ones(1, 63, dtype=torch.long)},  # explicit all-ones mask
    ]
    for batch in leaky:
        assert not torch.allclose(_logits(model, **batch)[23:32], _alone(model, exs[1]), atol=1e-3)
    with torch.no_grad():  # and with the KV cache on (the default), packing is silently ignored
        cached = model(**row).logits[0]
    assert not torch.allclose(cached[23:32], _alone(model, exs[1]), atol=1e-3)


def test_padded_logits_equal_separate_forward(models):
    model = models["llama"]
    model.set_attn_implementation("sdpa")
    exs = _examples(49152, [5, 12], seed=1)
    batch = {k: v for k, v in collate_padded(exs, pad_id=2).items() if k != "labels"}
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    torch.testing.assert_close(logits[0, :5], _alone(model, exs[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], _alone(model, exs[1]), atol=1e-5, rtol=1e-5)


def test_static_shape_pads_rows_and_width_exactly():
    from sft.data.collate import collate_packed_rows

    a, b = Example([1, 10, 11], [X, 10, 11]), Example([1, 20], [1, 20])
    out = collate_packed_rows([[a, b]], pad_id=0, shape=(2, 7))
    assert out["input_ids"].tolist() == [[1, 10, 11, 1, 20, 0, 0], [0] * 7]
    assert out["labels"].tolist() == [[X, 10, 11, X, 20, X, X], [X] * 7]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1], list(range(7))]
    padded = collate_padded([a, b], pad_id=0, shape=(3, 4))
    assert padded["input_ids"].tolist() == [[1, 10, 11, 0], [1, 20, 0, 0], [0, 0, 0, 0]]
    assert padded["labels"].tolist() == [[X, 10, 11, X], [X, 20, X, X], [X] * 4]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    # control: without a shape the batch is only as wide and as tall as its data
    assert collate_packed_rows([[a, b]], pad_id=0)["input_ids"].shape == (1, 5)


def test_static_shape_too_small_is_an_error():
    from sft.data.collate import collate_packed_rows
    from sft.errors import SftError

    a = Example([1, 10, 11], [X, 10, 11])
    with pytest.raises(SftError, match=r"static shape \(1, 2\)"):
        collate_packed_rows([[a]], pad_id=0, shape=(1, 2))
    with pytest.raises(SftError, match=r"2 rows"):
        collate_padded([a, a], pad_id=0, shape=(1, 8))
