"""The tiny jina-clip-v2 checkpoint is the same bytes on every write with the same seed (its tokenizer included).

tokenizers' Unigram trainer orders tied pieces and its appended single
characters in hash order and sums in parallel, so the raw trained
tokenizer.json changed between writes; ``canonical_unigram`` fixes one order.
"""

from __future__ import annotations

import json
import random

from jev4.families.jina_clip_v2.tiny import SCORE_DECIMALS, SPECIAL_TOKENS, canonical_unigram, write_tiny_checkpoint


def test_two_writes_with_one_seed_are_byte_identical(tmp_path):
    first = write_tiny_checkpoint(tmp_path / "a", seed=3)
    second = write_tiny_checkpoint(tmp_path / "b", seed=3)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert "tokenizer.json" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def _unigram(vocab: list[list]) -> str:
    return json.dumps({"model": {"type": "Unigram", "unk_id": 3, "vocab": vocab}, "added_tokens": []})


def test_canonical_order_ignores_tie_order_and_last_digit_noise():
    specials = [[t, 0.0] for t in SPECIAL_TOKENS]
    pieces = [["a", -2.0000000000000004], ["b", -2.0], ["c", -3.5], ["x", -8.9891], ["y", -8.9903], ["z", -8.9912]]
    rng = random.Random(0)
    outputs = set()
    for _ in range(10):
        shuffled = [list(p) for p in pieces]
        rng.shuffle(shuffled)
        tail = [p for p in shuffled if p[0] in "xyz"]  # the trainer's appended characters: same scores, any order
        for p, score in zip(tail, (-8.9891, -8.9903, -8.9912)):
            p[1] = score
        outputs.add(canonical_unigram(_unigram(specials + shuffled)))
    assert len(outputs) == 1
    vocab = json.loads(outputs.pop())["model"]["vocab"]
    assert vocab[:4] == specials  # XLM-R's ids 0-3 stay
    assert vocab[4:] == [["a", -2.0], ["b", -2.0], ["c", -3.5], ["x", -8.99], ["y", -8.99], ["z", -8.99]]
    assert all(round(s, SCORE_DECIMALS) == s for _, s in vocab)
