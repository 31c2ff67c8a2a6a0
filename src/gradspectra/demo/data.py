"""Generated data for the demo, the examples and the benchmarks: templated text tasks (sentiment reviews,
4-class topics, sentence pairs) with injected bad batches, and synthetic arithmetic with answer-only or
chain-of-thought responses (optionally with injected bad batches of several kinds).

Everything is generated from a seed; nothing is downloaded.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

Corruption = Literal[
    "label_noise",
    "random_tokens",
    "unrelated_words",
    "duplicate",
    "near_duplicate",
    "truncated",
    "short",
    "one_template",
]
CORRUPTIONS: tuple[str, ...] = get_args(Corruption)

_SUBJECTS = [
    "the blender",
    "this laptop",
    "the hotel room",
    "our waiter",
    "the new phone",
    "the delivery",
    "this novel",
    "the headphones",
    "the coffee machine",
    "the rental car",
    "the museum tour",
    "the yoga class",
    "the app",
    "the backpack",
    "the pizza",
    "the customer service",
    "this jacket",
    "the hiking boots",
    "the concert",
    "the vacuum cleaner",
    "the train ride",
    "the dentist",
    "the camera",
    "the garden hose",
    "the keyboard",
]
_POSITIVE = [
    "works perfectly",
    "exceeded my expectations",
    "was a delight",
    "is worth every penny",
    "felt premium",
    "was fast and friendly",
    "made my week",
    "is sturdy and reliable",
    "was spotless",
    "sounds amazing",
    "arrived early and intact",
    "is easy to use",
    "was genuinely helpful",
    "keeps going all day",
    "tastes wonderful",
]
_NEGATIVE = [
    "broke after two days",
    "was a huge disappointment",
    "is a waste of money",
    "felt cheap and flimsy",
    "was rude and slow",
    "ruined my week",
    "stopped working",
    "was filthy",
    "sounds terrible",
    "arrived late and damaged",
    "is confusing to use",
    "was no help at all",
    "dies within an hour",
    "tastes awful",
    "fell apart quickly",
]
_OPENERS = ["", "honestly, ", "I have to say ", "after a month, ", "to be fair, ", "in short, ", "well, "]
_POS_TAILS = ["", " and I would buy it again", " so I recommend it", " and my family loves it", " five stars"]
_NEG_TAILS = ["", " and I want a refund", " so avoid it", " and support never replied", " one star"]
_FILLER = [
    "apple",
    "river",
    "seven",
    "blue",
    "window",
    "quantum",
    "sand",
    "violin",
    "ledger",
    "orbit",
    "pepper",
    "marble",
    "tunnel",
    "gravity",
    "lantern",
    "cactus",
    "novel",
    "engine",
    "harbor",
    "puzzle",
    "velvet",
    "crater",
    "zebra",
]


def review(rng: random.Random, label: int) -> str:
    """One templated review; ``label`` 1 is positive, 0 negative."""
    subject = rng.choice(_SUBJECTS)
    verdict = rng.choice(_POSITIVE if label else _NEGATIVE)
    tail = rng.choice(_POS_TAILS if label else _NEG_TAILS)
    return f"{rng.choice(_OPENERS)}{subject} {verdict}{tail}."


@dataclass
class Sample:
    """One classification sample; ``pair`` is the second sentence of a sentence-pair task (else ``None``)."""

    sample_id: int
    text: str
    label: int
    pair: str | None = None


_TOPICS: dict[str, tuple[list[str], list[str]]] = {  # label order: sports, technology, food, travel
    "sports": (
        [
            "the striker",
            "our goalkeeper",
            "the home team",
            "the coach",
            "the marathon runner",
            "the referee",
            "the tennis final",
            "the relay team",
            "the young sprinter",
            "the league",
        ],
        [
            "scored twice in the second half",
            "won the cup after extra time",
            "broke the national record",
            "was sent off before the break",
            "signed a three year contract",
            "lost the derby on penalties",
            "trained hard all winter",
            "drew a record crowd",
        ],
    ),
    "technology": (
        [
            "the new chip",
            "the startup",
            "this operating system",
            "the search engine",
            "the battery maker",
            "the robot arm",
            "the cloud provider",
            "the browser update",
            "the chip designer",
            "the satellite",
        ],
        [
            "doubled its processing speed",
            "patched a serious security flaw",
            "released an open source model",
            "shipped a faster compiler",
            "cut power use by half",
            "raised funding for its servers",
            "moved its data centre north",
            "rewrote the network driver",
        ],
    ),
    "food": (
        [
            "the bakery",
            "this soup",
            "the chef",
            "the night market",
            "the vegan menu",
            "the family recipe",
            "the corner cafe",
            "the cheese shop",
            "the street vendor",
            "the tasting menu",
        ],
        [
            "uses fresh basil and garlic",
            "slow cooks the beans overnight",
            "serves warm bread with butter",
            "adds a pinch of smoked salt",
            "bakes sourdough every morning",
            "won a prize for its dumplings",
            "grills the fish over charcoal",
            "makes its own pasta",
        ],
    ),
    "travel": (
        [
            "the ferry",
            "our guide",
            "the mountain lodge",
            "the night train",
            "the old harbour",
            "the airline",
            "the coastal road",
            "the hostel",
            "the island tour",
            "the border crossing",
        ],
        [
            "runs twice a day in summer",
            "offers views over the glacier",
            "added a direct route to the coast",
            "was delayed by the storm",
            "books out months ahead",
            "stops at every fishing village",
            "includes a visit to the caves",
            "crosses the pass before dawn",
        ],
    ),
}
TOPIC_NAMES: tuple[str, ...] = tuple(_TOPICS)
_TOPIC_OPENERS = ["", "news: ", "reportedly ", "this week ", "as expected, ", "locals say "]

#: The tasks :func:`text_batches` generates, with their number of classes.
TEXT_TASKS: dict[str, int] = {"reviews": 2, "topics": 4, "pairs": 2}
#: Per task and label, the word a ``one_template`` batch puts in its one template.
_TEMPLATE_WORDS: dict[str, tuple[str, ...]] = {
    "reviews": ("bad", "good"),
    "topics": TOPIC_NAMES,
    "pairs": ("different", "same"),
}
_SHORT_TEXTS = ["ok", "fine.", "good", "meh", "yes", "no.", "great!", "hmm", "sure", "whatever", "nice", "bad"]


def topic(rng: random.Random, label: int) -> str:
    """One templated news-style sentence about topic ``label`` (an index of :data:`TOPIC_NAMES`)."""
    subjects, events = _TOPICS[TOPIC_NAMES[label]]
    return f"{rng.choice(_TOPIC_OPENERS)}{rng.choice(subjects)} {rng.choice(events)}."


def sentence_pair(rng: random.Random) -> tuple[str, str, int]:
    """Two reviews and whether they share their sentiment (label 1) or not (0), classes balanced."""
    first = rng.randint(0, 1)
    same = rng.randint(0, 1)
    second = first if same else 1 - first
    return review(rng, first), review(rng, second), same


@dataclass
class PlannedBatch:
    """One batch of the demo's stream; ``corruption`` names what was done to it (``None`` when clean)."""

    index: int
    samples: list[Sample]
    corruption: str | None = None
    notes: dict[str, str] = field(default_factory=dict)


def review_batches(
    num_batches: int,
    batch_size: int = 16,
    corrupt_fraction: float = 0.12,
    corruptions: tuple[str, ...] = ("label_noise", "random_tokens", "duplicate"),
    clean_prefix: int = 25,
    seed: int = 0,
    base_label_noise: float = 0.1,
) -> list[PlannedBatch]:
    """A stream of review batches with a share of deliberately corrupted ones.

    The first ``clean_prefix`` batches are clean (the monitor's warm-up); after that each batch is
    corrupted with probability ``corrupt_fraction``, cycling through ``corruptions``:

    - ``label_noise``: every label flipped;
    - ``random_tokens``: every word replaced by a random string of 2-6 letters, which a subword
      tokenizer cuts into arbitrary pieces: random-token text (labels kept);
    - ``unrelated_words``: texts replaced by strings of ordinary, unrelated English words (labels
      kept); readable tokens without meaning, a milder cousin of ``random_tokens``;
    - ``duplicate``: one sample repeated ``batch_size`` times (no diversity);
    - ``near_duplicate``: one sample repeated with a single word changed per copy;
    - ``truncated``: every text cut to its first word;
    - ``short``: every text replaced by a one-word reply ("ok", "meh", ...; labels kept);
    - ``one_template``: every text the one template "this is <word>." with a word that gives its label
      away ("good" / "bad"; the topic's name): easy, uniform, nearly content-free.

    Every sample has a unique ``sample_id``. Like real data, clean batches carry some label noise
    too (``base_label_noise``, each label flipped independently): the loss then levels off instead of
    collapsing to zero, as it does in a real fine-tune.
    """
    return text_batches(
        "reviews",
        num_batches,
        batch_size=batch_size,
        corrupt_fraction=corrupt_fraction,
        corruptions=corruptions,
        clean_prefix=clean_prefix,
        seed=seed,
        base_label_noise=base_label_noise,
    )


def text_batches(
    task: str,
    num_batches: int,
    batch_size: int = 16,
    corrupt_fraction: float = 0.12,
    corruptions: tuple[str, ...] = ("label_noise", "random_tokens", "duplicate"),
    clean_prefix: int = 25,
    seed: int = 0,
    base_label_noise: float = 0.1,
) -> list[PlannedBatch]:
    """A stream of batches of one text task of :data:`TEXT_TASKS`, a share of them corrupted.

    ``"reviews"``: sentiment of a templated review (2 classes); ``"topics"``: the topic of a
    templated news sentence (4 classes: :data:`TOPIC_NAMES`); ``"pairs"``: whether two reviews share
    their sentiment (a sentence pair, ``Sample.pair``). Corruption kinds and the other arguments as
    in :func:`review_batches` (a flipped label of a 4-class task moves to another class at random;
    a pair's two sentences are corrupted alike).
    """
    if task not in TEXT_TASKS:
        raise ValueError(f"`task` can be {', '.join(TEXT_TASKS)}, got {task!r}")
    if not 0.0 <= corrupt_fraction <= 1.0:
        raise ValueError(f"`corrupt_fraction` must be in [0, 1], got {corrupt_fraction!r}")
    if not 0.0 <= base_label_noise <= 0.5:
        raise ValueError(f"`base_label_noise` must be in [0, 0.5], got {base_label_noise!r}")
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"`corruptions` can be any of {', '.join(CORRUPTIONS)}, got {list(corruptions)!r}")
    num_labels = TEXT_TASKS[task]
    rng = random.Random(seed)
    next_id = 0
    batches = []
    kinds = list(corruptions)
    k = 0
    for b in range(num_batches):
        samples = []
        for _ in range(batch_size):
            if task == "pairs":
                text, pair, label = sentence_pair(rng)
                noisy = 1 - label if rng.random() < base_label_noise else label
                samples.append(Sample(next_id, text, noisy, pair))
            else:
                label = rng.randrange(num_labels)
                noisy = _other_label(rng, label, num_labels) if rng.random() < base_label_noise else label
                samples.append(Sample(next_id, review(rng, label) if task == "reviews" else topic(rng, label), noisy))
            next_id += 1
        corruption = None
        if b >= clean_prefix and kinds and rng.random() < corrupt_fraction:
            corruption = kinds[k % len(kinds)]
            k += 1
            samples = corrupt(samples, corruption, rng, task=task)
        batches.append(PlannedBatch(b, samples, corruption))
    return batches


def _other_label(rng: random.Random, label: int, num_labels: int) -> int:
    """Another class than ``label``, at random (two classes: the other one, drawing nothing)."""
    if num_labels == 2:
        return 1 - label
    return (label + rng.randrange(1, num_labels)) % num_labels


def corrupt(samples: list[Sample], kind: str, rng: random.Random, task: str = "reviews") -> list[Sample]:
    """Apply corruption ``kind`` (see :func:`review_batches`) to a batch of ``task``, keeping sample ids."""
    if task not in TEXT_TASKS:
        raise ValueError(f"`task` can be {', '.join(TEXT_TASKS)}, got {task!r}")

    def texts(s: Sample, change: Callable[[str], str]) -> Sample:
        return Sample(s.sample_id, change(s.text), s.label, None if s.pair is None else change(s.pair))

    if kind == "label_noise":
        n = TEXT_TASKS[task]
        return [Sample(s.sample_id, s.text, _other_label(rng, s.label, n), s.pair) for s in samples]
    if kind == "random_tokens":
        return [texts(s, lambda t: _random_words(rng, len(t.split()))) for s in samples]
    if kind == "unrelated_words":
        return [texts(s, lambda t: " ".join(rng.choice(_FILLER) for _ in range(len(t.split())))) for s in samples]
    if kind == "duplicate":
        first = samples[0]
        return [Sample(s.sample_id, first.text, first.label, first.pair) for s in samples]
    if kind == "near_duplicate":
        first = samples[0]

        def one_word_changed(text: str) -> str:
            words = text.split()
            words[rng.randrange(len(words))] = rng.choice(_FILLER)
            return " ".join(words)

        return [
            Sample(s.sample_id, one_word_changed(first.text), first.label, first.pair and one_word_changed(first.pair))
            for s in samples
        ]
    if kind == "truncated":
        return [texts(s, lambda t: t.split()[0]) for s in samples]
    if kind == "short":
        return [texts(s, lambda t: rng.choice(_SHORT_TEXTS)) for s in samples]
    if kind == "one_template":
        words = _TEMPLATE_WORDS[task]
        if task == "pairs":
            return [
                Sample(s.sample_id, "this is good.", s.label, f"this is {'good' if s.label else 'bad'}.")
                for s in samples
            ]
        return [Sample(s.sample_id, f"this is {words[s.label]}.", s.label) for s in samples]
    raise ValueError(f"`kind` can be {', '.join(CORRUPTIONS)}, got {kind!r}")


def _random_words(rng: random.Random, n: int) -> str:
    """``n`` words of 2-6 random lowercase letters."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(n))


def arithmetic_problem(rng: random.Random) -> tuple[str, str, str]:
    """``(prompt, answer_only, chain_of_thought)`` for a two-step arithmetic word problem.

    Both responses end with the same final answer; the chain-of-thought one spells out each step,
    as in the fast-vs-slow-thinking paper's contrast.
    """
    a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
    total = (a + b) * c
    prompt = f"Q: Tom has {a} apples and buys {b} more. He packs all of them {c} times over. How many apples? A:"
    fast = f" The answer is {total}."
    slow = (
        f" Tom starts with {a} apples. Buying {b} more gives {a} + {b} = {a + b}. "
        f"Packing them {c} times over gives {a + b} * {c} = {total}. The answer is {total}."
    )
    return prompt, fast, slow


LMCorruption = Literal["irrelevant_response", "answer_only", "duplicate", "random_tokens"]
LM_CORRUPTIONS: tuple[str, ...] = get_args(LMCorruption)


@dataclass
class LMSample:
    """One prompt/response pair for a causal LM (the loss is taken on the response only)."""

    sample_id: int
    prompt: str
    response: str


@dataclass
class PlannedLMBatch:
    """One batch of a causal-LM stream; ``corruption`` names what was done to it (``None`` when clean)."""

    index: int
    samples: list[LMSample]
    corruption: str | None = None


_RANDOM_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 "


def _sentences(response: str) -> list[str]:
    """A response split after each ``". "``; every piece keeps its full stop and leading space."""
    parts = response.strip().split(". ")
    return [" " + p + ("" if p.endswith(".") else ".") for p in parts]


def _final_answer(response: str) -> int:
    """The number in a response's closing "The answer is N."."""
    return int(response.split()[-1].rstrip("."))


def irrelevant_response(prompt_total: int, others: list[tuple[str, str, int]], rng: random.Random) -> str:
    """A response to a prompt whose answer is ``prompt_total``, assembled from other samples' responses.

    The construction of the fast-vs-slow-thinking paper: the same instruction paired with a response
    made of sentences taken, position by position, from other samples' responses (so it has the
    length and form of a real one), ending with a final answer that does not match the prompt.

    Args:
        prompt_total: the correct final answer of the prompt being answered.
        others: ``(answer_only, chain_of_thought, total)`` of other samples (at least one whose total
            differs from ``prompt_total``); the style follows how many sentences the first one has.
        rng: the random source.
    """
    donors = [o for o in others if o[2] != prompt_total]
    if not donors:
        raise ValueError("`others` must contain a sample whose final answer differs from `prompt_total`")
    template = _sentences(others[0][1])
    pieces = []
    for i in range(len(template) - 1):
        donor = _sentences(rng.choice(donors)[1])
        pieces.append(donor[min(i, len(donor) - 1)])
    pieces.append(_sentences(rng.choice(donors)[1])[-1])  # "The answer is <someone else's total>."
    return "".join(pieces)


def arithmetic_batches(
    num_batches: int,
    batch_size: int = 16,
    corrupt_fraction: float = 0.12,
    corruptions: tuple[str, ...] = ("irrelevant_response",),
    clean_prefix: int = 25,
    seed: int = 0,
    chain_of_thought: bool = True,
) -> list[PlannedLMBatch]:
    """A stream of arithmetic prompt/response batches for a causal LM, with a share of corrupted ones.

    The first ``clean_prefix`` batches are clean; after that each batch is corrupted with probability
    ``corrupt_fraction``, cycling through ``corruptions``:

    - ``irrelevant_response``: every sample's response is assembled from other samples' responses with
      a mismatched final answer (see :func:`irrelevant_response`);
    - ``answer_only``: in a chain-of-thought stream, responses without their reasoning (" The answer is
      N."), the fast-thinking answers of the papers;
    - ``duplicate``: one sample repeated ``batch_size`` times;
    - ``random_tokens``: every response replaced by random letters and digits of the same length.

    Responses are chain-of-thought (``chain_of_thought=True``) or answer-only.
    """
    if not 0.0 <= corrupt_fraction <= 1.0:
        raise ValueError(f"`corrupt_fraction` must be in [0, 1], got {corrupt_fraction!r}")
    unknown = [c for c in corruptions if c not in LM_CORRUPTIONS]
    if unknown:
        raise ValueError(f"`corruptions` can be any of {', '.join(LM_CORRUPTIONS)}, got {list(corruptions)!r}")
    rng = random.Random(seed)
    next_id = 0
    batches = []
    kinds = list(corruptions)
    k = 0
    for b in range(num_batches):
        problems = []
        for _ in range(batch_size):
            prompt, fast, slow = arithmetic_problem(rng)
            problems.append((prompt, fast, slow, _final_answer(fast)))
        corruption = None
        if b >= clean_prefix and kinds and rng.random() < corrupt_fraction:
            corruption = kinds[k % len(kinds)]
            k += 1
        samples = []
        for prompt, fast, slow, total in problems:
            response = slow if chain_of_thought else fast
            if corruption == "answer_only":
                response = fast
            elif corruption == "random_tokens":
                response = " " + "".join(rng.choice(_RANDOM_CHARS) for _ in range(len(response) - 1))
            elif corruption == "irrelevant_response":
                # donors are fresh problems, so no response is borrowed from inside this batch
                pool = []
                for _ in range(4):
                    _, d_fast, d_slow = arithmetic_problem(rng)
                    pool.append((d_fast, d_slow if chain_of_thought else d_fast, _final_answer(d_fast)))
                response = irrelevant_response(total, pool, rng)
            samples.append(LMSample(next_id, prompt, response))
            next_id += 1
        if corruption == "duplicate":
            samples = [LMSample(s.sample_id, samples[0].prompt, samples[0].response) for s in samples]
        batches.append(PlannedLMBatch(b, samples, corruption))
    return batches
