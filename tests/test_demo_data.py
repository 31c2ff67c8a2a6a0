"""The demo's generated batches (reviews, topics, sentence pairs, arithmetic): each corruption kind does what its
docstring says."""

from __future__ import annotations

import random

import pytest

from gradspectra.demo.data import (
    CORRUPTIONS,
    LM_CORRUPTIONS,
    TEXT_TASKS,
    Sample,
    arithmetic_batches,
    corrupt,
    review,
    review_batches,
    sentence_pair,
    text_batches,
)
from gradspectra.demo.models import schedule_factor


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


def test_short_and_one_template_texts() -> None:
    batch = clean_batch()
    short = corrupt(batch, "short", random.Random(1))
    assert all(len(s.text.split()) == 1 for s in short) and [s.label for s in short] == [s.label for s in batch]
    template = corrupt(batch, "one_template", random.Random(1))
    assert {s.text for s in template} == {"this is good.", "this is bad."}
    assert all(s.text == ("this is good." if s.label else "this is bad.") for s in template)


@pytest.mark.parametrize("task", ["reviews", "topics", "pairs"])
def test_text_tasks_have_their_classes_and_inputs(task: str) -> None:
    planned = text_batches(task, 60, corruptions=CORRUPTIONS, corrupt_fraction=0.5, clean_prefix=10, seed=1)
    clean = [s for b in planned if b.corruption is None for s in b.samples]
    labels = {s.label for s in clean}
    assert labels == set(range(TEXT_TASKS[task]))
    assert all((s.pair is not None) == (task == "pairs") for b in planned for s in b.samples)
    assert len({s.sample_id for b in planned for s in b.samples}) == 60 * 16
    assert {b.corruption for b in planned if b.corruption} == set(CORRUPTIONS)


def test_topics_label_noise_moves_to_another_class() -> None:
    planned = text_batches("topics", 1, corrupt_fraction=0.0, seed=2)
    batch = planned[0].samples
    out = corrupt(batch, "label_noise", random.Random(1), task="topics")
    assert all(a.label != b.label and 0 <= b.label < 4 for a, b in zip(batch, out))
    assert {s.text for s in out} == {s.text for s in batch}


def test_pairs_are_labelled_by_shared_sentiment_and_corrupted_on_both_sides() -> None:
    rng = random.Random(0)
    for _ in range(50):
        first, second, same = sentence_pair(rng)
        assert same in (0, 1) and first and second
    planned = text_batches("pairs", 1, corrupt_fraction=0.0, seed=3)
    out = corrupt(planned[0].samples, "random_tokens", random.Random(1), task="pairs")
    words = vocabulary()
    every = [t for s in out for t in s.text.split() + (s.pair or "").split()]
    assert sum(t in words for t in every) < 0.05 * len(every)


@pytest.mark.parametrize("kind", LM_CORRUPTIONS)
def test_arithmetic_kinds(kind: str) -> None:
    planned = arithmetic_batches(40, corruptions=(kind,), corrupt_fraction=1.0, clean_prefix=5, seed=0)
    clean, bad = planned[0].samples, planned[5].samples
    assert planned[5].corruption == kind and all(b.corruption is None for b in planned[:5])
    if kind == "answer_only":
        assert all(s.response.startswith(" The answer is ") for s in bad)
    elif kind == "duplicate":
        assert len({(s.prompt, s.response) for s in bad}) == 1 and len({s.sample_id for s in bad}) == 16
    elif kind == "random_tokens":
        assert not any("answer" in s.response for s in bad)
    else:
        assert all("The answer is" in s.response for s in bad)
    assert all(" = " in s.response for s in clean)


def test_schedules() -> None:
    factor = schedule_factor("warmup_decay", 100)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(99) == pytest.approx(0.1) and factor(54) == pytest.approx(0.55, abs=0.01)
    assert schedule_factor("constant", None)(50) == 1.0
    with pytest.raises(ValueError, match="`schedule` can be constant, warmup_decay, got 'cosine'"):
        schedule_factor("cosine", 100)
    with pytest.raises(ValueError, match="`total_steps` must be an int >= 2"):
        schedule_factor("warmup_decay", None)
    with pytest.raises(ValueError, match="`task` can be reviews, topics, pairs, got 'qa'"):
        text_batches("qa", 3)


def test_sentence_pairs_are_tokenized_as_pairs() -> None:
    from gradspectra.demo.models import TokenizedBatches, load_tokenizer

    tokenizer = load_tokenizer()
    planned = text_batches("pairs", 2, batch_size=4, corrupt_fraction=0.0, seed=0)
    data = TokenizedBatches(planned, tokenizer, max_length=48)
    ids = data[0]["input_ids"]
    assert ids.shape == (4, 48)
    assert all(int((row == tokenizer.sep_token_id).sum()) == 2 for row in ids)  # text [SEP] pair [SEP]
    single = TokenizedBatches(text_batches("topics", 1, batch_size=4, corrupt_fraction=0.0), tokenizer, 48)
    assert all(int((row == tokenizer.sep_token_id).sum()) == 1 for row in single[0]["input_ids"])
