"""sft.data.masks, the pieces that turn a rendered conversation into labels, with exact values
on SmolLM2's real tokenizer (ChatML) and Gemma's; whole-conversation masks are pinned in
tests/data/test_chat.py."""

from __future__ import annotations

from sft.data import masks
from sft.data.chat import resolve_template
from sft.data.types import IGNORE

TURN = "<|im_start|>assistant\nHi<|im_end|>\n"


def test_tokenize_gives_ids_with_character_offsets(smol_tok):
    ids, offsets = masks.tokenize(smol_tok, TURN)
    assert ids == [1, 520, 9531, 198, 26843, 2, 198]
    assert offsets == [(0, 12), (12, 15), (15, 21), (21, 22), (22, 24), (24, 34), (34, 35)]
    assert [TURN[s:e] for s, e in offsets] == ["<|im_start|>", "ass", "istant", "\n", "Hi", "<|im_end|>", "\n"]


def test_end_of_turn_marker_of_real_templates(smol_tok, gemma_tok):
    assert masks.end_of_turn(smol_tok, resolve_template("chatml", smol_tok)) == "<|im_end|>"
    assert masks.end_of_turn(gemma_tok, resolve_template("gemma", gemma_tok)) == "<end_of_turn>"


def test_turn_region_ends_after_the_marker_not_the_newline():
    assert masks.turn_region(TURN, 22, "<|im_end|>") == 34  # "Hi<|im_end|>": the newline is not trained
    assert masks.turn_region(TURN, 22, None) == 34  # no marker: the end of the non-blank text
    assert masks.turn_region("Hi there  \n", 0, None) == 8


def test_labels_for_trains_tokens_overlapping_a_region(smol_tok):
    ids, offsets = masks.tokenize(smol_tok, TURN)
    labels = masks.labels_for(ids, offsets, [(22, 34)], IGNORE)  # the reply and its end-of-turn marker
    assert labels == [IGNORE, IGNORE, IGNORE, IGNORE, 26843, 2, IGNORE]
    assert smol_tok.decode([t for t in labels if t != IGNORE]) == "Hi<|im_end|>"
    # a token that only partly overlaps a region is trained; one that touches its end is not
    assert masks.labels_for([10, 11, 12, 13], [(0, 2), (2, 4), (4, 6), (6, 8)], [(3, 6)], IGNORE) == [
        IGNORE, 11, 12, IGNORE]
    assert masks.labels_for(ids, offsets, [], IGNORE) == [IGNORE] * len(ids)  # control: no region, nothing trained
