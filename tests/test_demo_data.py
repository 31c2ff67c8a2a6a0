"""The demo's generated review batches: each corruption kind does what its docstring says."""

from __future__ import annotations

import random

import pytest

from gradspectra.demo.data import CORRUPTIONS, Sample, corrupt, review, review_batches


def clean_batch(n: int = 16, seed: int = 3) -> list[Sample]:
    rng = random.Random(seed)
    return [Sample(i, review(rng, i % 2), i % 2) for i in range(n)]


def vocabulary() -> set[str]:
    rng = random.Random(0)
    return {w for _ in range(2000) for w in review(rng, rng.randint(0, 1)).replace(",", "").split()}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_every_kind_keeps_the_sample_ids(kind: str) -> None:
    batch = clean_batch()
    out = corrupt(batch, kind, random.Random(1))
    assert [s.sample_id for s in out] == [s.sample_id for s in batch]


def test_label_noise_flips_every_label_and_keeps_the_text() -> None:
    batch = clean_batch()
    out = corrupt(batch, "label_noise", random.Random(1))
    assert [s.label for s in out] == [1 - s.label for s in batch]
    assert [s.text for s in out] == [s.text for s in batch]


def test_random_tokens_are_random_letters_not_words_of_the_reviews() -> None:
    batch = clean_batch()
    out = corrupt(batch, "random_tokens", random.Random(1))
    words = vocabulary()
    for before, after in zip(batch, out):
        tokens = after.text.split()
        assert len(tokens) == len(before.text.split())
        assert all(t.isalpha() and t.islower() and 2 <= len(t) <= 6 for t in tokens)
        assert after.label == before.label
    every = [t for s in out for t in s.text.split()]
    # random strings, not the reviews' vocabulary (a few short ones may collide, such as "so")
    assert sum(t in words for t in every) < 0.05 * len(every)
    assert len(set(every)) > 0.9 * len(every)


def test_unrelated_words_are_ordinary_words_outside_the_reviews() -> None:
    batch = clean_batch()
    out = corrupt(batch, "unrelated_words", random.Random(1))
    words = vocabulary()
    every = [t for s in out for t in s.text.split()]
    assert sum(t in words for t in every) < 0.15 * len(every)  # "novel" is also a reviewed product
    assert len(set(every)) < 0.5 * len(every)  # drawn from a short list of real words


def test_duplicate_and_near_duplicate_repeat_the_first_sample() -> None:
    batch = clean_batch()
    dup = corrupt(batch, "duplicate", random.Random(1))
    assert {(s.text, s.label) for s in dup} == {(batch[0].text, batch[0].label)}
    near = corrupt(batch, "near_duplicate", random.Random(1))
    first = batch[0].text.split()
    for s in near:
        words = s.text.split()
        assert len(words) == len(first)
        assert sum(a != b for a, b in zip(words, first)) <= 1
        assert s.label == batch[0].label


def test_truncated_keeps_one_word() -> None:
    out = corrupt(clean_batch(), "truncated", random.Random(1))
    assert all(len(s.text.split()) == 1 for s in out)


def test_review_batches_inject_the_kinds_in_turn_after_the_clean_prefix() -> None:
    planned = review_batches(200, corruptions=("random_tokens", "unrelated_words"), clean_prefix=25, seed=0)
    kinds = [b.corruption for b in planned if b.corruption is not None]
    assert all(b.corruption is None for b in planned[:25])
    assert kinds[:4] == ["random_tokens", "unrelated_words", "random_tokens", "unrelated_words"]
    assert 0.05 < len(kinds) / 175 < 0.25


def test_unknown_kind_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"`corruptions` can be any of .*'gibberish'"):
        review_batches(10, corruptions=("gibberish",))
    with pytest.raises(ValueError, match="`kind` can be"):
        corrupt(clean_batch(), "gibberish", random.Random(0))
