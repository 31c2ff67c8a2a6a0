"""`score_data` against the papers' method computed here independently: per sample, transformers' own loss
(labels with the prompt at -100), one backward, `.grad`, float64 SVD, metrics from numpy formulas."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from gradspectra import score_data  # noqa: E402
from gradspectra.data_scoring import ranked_table, write_scores  # noqa: E402
from gradspectra.demo.models import CharTokenizer, load_tokenizer, minilm_path  # noqa: E402

KEY = re.compile(r"layers?\.(\d+)\.(self_attn\.[qkvo]_proj|attention\.self\.\w+|attention\.output\.dense)\.weight$")

LM_DATA = [
    {"prompt": "Q: 3 + 4? A:", "response": " 7.", "id": "short"},
    {"prompt": "Q: Tom has 12 apples and buys 5 more. How many? A:", "response": " 12 + 5 = 17. The answer is 17."},
    {"prompt": "Q: 2 * 9? A:", "response": " The answer is 18.", "id": 3},
    {"prompt": "Say hi:", "response": " hi there, how are you today?", "id": "greet"},
    {"prompt": "Q: 40 - 8? A:", "response": " 40 - 8 = 32.", "id": "sub"},
]
TEXT_DATA = [
    {"text": "the blender works perfectly.", "label": 1, "id": "a"},
    {"text": "this laptop broke after two days, what a waste of money.", "label": 0},
    {"text": "great", "label": 2, "id": "c", "text_pair": "a short second sentence"},
    {"text": "the hotel room was filthy and the staff were rude and slow.", "label": 0, "id": "d"},
]


def numpy_metrics(s: np.ndarray) -> dict[str, float]:
    """The package's metric definitions, written out again (papers: erank with p = s / sum s, natural log)."""
    total = s.sum()
    p = s[s > 0] / total
    fro2 = float((s**2).sum())
    return {
        "nuclear_norm": float(total),
        "spectral_norm": float(s[0]),
        "frobenius_norm": math.sqrt(fro2),
        "stable_rank": fro2 / float(s[0]) ** 2,
        "top_sv_ratio": float(s[0] / total),
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "participation_ratio": fro2**2 / float((s**4).sum()),
    }


def reference_lm(model: nn.Module, data: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per sample: transformers' loss on prompt+response with the prompt labelled -100, backward, SVD."""
    tok = CharTokenizer()
    out = []
    for row in data:
        p, r = tok.encode(row["prompt"]), tok.encode(row["response"])
        ids = torch.tensor([p + r])
        labels = torch.tensor([[-100] * len(p) + r])
        out.append(_backward_and_svd(model, {"input_ids": ids, "labels": labels}))
    return out


def reference_classifier(model: nn.Module, tokenizer: Any, data: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in data:
        enc = tokenizer(row["text"], row.get("text_pair"), return_tensors="pt")
        out.append(_backward_and_svd(model, {**enc, "labels": torch.tensor([row["label"]])}))
    return out


def _backward_and_svd(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    model.eval()
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    layers = {}
    for name, param in model.named_parameters():
        m = KEY.search(name)
        if m:
            s = torch.linalg.svdvals(param.grad.double()).numpy()
            layers[f"{m.group(2)}/layer_{int(m.group(1)):02d}"] = numpy_metrics(s)
    model.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach()), "layers": layers}


def assert_close(rows: Sequence[dict[str, Any]], refs: Sequence[dict[str, Any]], rtol: float) -> float:
    worst = 0.0
    for row, ref in zip(rows, refs, strict=True):
        assert set(row["layers"]) == set(ref["layers"])
        assert row["loss"] == pytest.approx(ref["loss"], rel=rtol)
        for key, values in ref["layers"].items():
            for metric, want in values.items():
                got = row["layers"][key][metric]
                worst = max(worst, abs(got - want) / abs(want))
                assert got == pytest.approx(want, rel=rtol), (row["index"], key, metric)
    return worst


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=CharTokenizer().vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config).double()


@pytest.fixture(scope="module")
def minilm_tokenizer() -> Any:
    return load_tokenizer()


def bert_config(vocab_size: int, **extra: Any) -> Any:
    """A tiny BERT: 2 layers of width 32."""
    return transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **extra,
    )


@pytest.fixture(scope="module")
def bert(minilm_tokenizer: Any) -> nn.Module:
    torch.manual_seed(1)
    return transformers.BertForSequenceClassification(bert_config(minilm_tokenizer.vocab_size, num_labels=3)).double()


def test_llama_float64_equals_reference(llama: nn.Module) -> None:
    refs = reference_lm(llama, LM_DATA)
    rows = score_data(llama, LM_DATA, tokenizer=CharTokenizer(), batch_size=3, progress=False)
    assert len(rows[0]["layers"]) == 12  # q/k/v/o of 3 layers
    assert [r["id"] for r in rows] == ["short", None, 3, "greet", "sub"]
    assert [r["tokens"] for r in rows] == [len(d["response"]) for d in LM_DATA]
    assert len({r["length"] for r in rows}) > 1  # different lengths: the batches are padded
    assert_close(rows, refs, 1e-6)
    # the built-in reference route is the same method
    assert_close(score_data(llama, LM_DATA, tokenizer=CharTokenizer(), method="reference", progress=False), refs, 1e-6)
    row = rows[1]
    for metric in ("nuclear_norm", "effective_rank"):
        assert row["summary"][metric] == pytest.approx(np.mean([v[metric] for v in row["layers"].values()]))
        curves = [[row["layers"][f"self_attn.{c}_proj/layer_{i:02d}"][metric] for i in range(3)] for c in "qkvo"]
        assert row["mad"][metric] == pytest.approx(np.mean([np.abs(np.diff(c)).mean() for c in curves]))
    assert all(p.grad is None for p in llama.parameters())


def test_bert_float64_equals_reference(bert: nn.Module, minilm_tokenizer: Any) -> None:
    refs = reference_classifier(bert, minilm_tokenizer, TEXT_DATA)
    rows = score_data(bert, TEXT_DATA, tokenizer=minilm_tokenizer, batch_size=4, progress=False)
    assert {k.split("/")[0] for k in rows[0]["layers"]} == {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
    }
    assert [r["tokens"] for r in rows] == [1, 1, 1, 1]
    assert_close(rows, refs, 1e-6)


def test_pretrained_minilm_float32_equals_reference(minilm_tokenizer: Any) -> None:
    # The same float32 weights give slightly different activations in a padded batch of 4 and alone (other
    # matmul blockings); measured worst relative difference over all 24 matrices x 7 metrics: ~1e-5
    # (benchmark, 64 samples: 8.6e-6). 1e-4 leaves room and still fails on any real error (>= 1e-2).
    from gradspectra.data_scoring import load_model

    model, _ = load_model(minilm_path(), "classification", 3)
    data = [TEXT_DATA[1], TEXT_DATA[2]]  # a long text and a short pair: the pair is padded in the batch
    refs = reference_classifier(model, minilm_tokenizer, data)
    rows = score_data(model, data, tokenizer=minilm_tokenizer, batch_size=2, progress=False)
    assert len(rows[0]["layers"]) == 24
    worst = assert_close(rows, refs, 1e-4)
    assert worst < 1e-4


def test_batch_size_does_not_change_values(llama: nn.Module) -> None:
    data = LM_DATA + [{"prompt": d["response"], "response": d["prompt"]} for d in LM_DATA[:4]]
    for mode in (True, False):
        llama.train(mode)
        score_data(llama, data[:2], tokenizer=CharTokenizer(), progress=False)
        assert llama.training is mode  # measured in eval mode, the caller's mode restored
    one = score_data(llama, data, tokenizer=CharTokenizer(), batch_size=1, progress=False)
    seven = score_data(llama, data, tokenizer=CharTokenizer(), batch_size=7, progress=False)
    assert [r["index"] for r in seven] == list(range(9))
    assert_close(seven, one, 1e-9)


def test_nan_gives_nan_and_a_note(llama: nn.Module) -> None:
    broken = type(llama)(llama.config).double()
    broken.load_state_dict(llama.state_dict())
    z = CharTokenizer().index["Z"]
    with torch.no_grad():
        broken.get_input_embeddings().weight[z] = float("nan")
    data = [*LM_DATA[:3], {"prompt": "Q: Z? A:", "response": " Zed."}]
    for method in ("factored", "reference"):
        rows = score_data(broken, data, tokenizer=CharTokenizer(), method=method, progress=False)  # type: ignore[arg-type]
        bad = rows[3]
        assert math.isnan(bad["loss"]) and "non-finite" in bad["note"]
        assert all(math.isnan(v) for values in bad["layers"].values() for v in values.values())
        assert all(math.isnan(v) for v in bad["summary"].values())
        assert all(r["note"] is None for r in rows[:3])
        assert_close(rows[:3], reference_lm(llama, data[:3]), 1e-6)
    table = ranked_table(rows)
    assert table.splitlines()[2].split()[1] == "3"  # NaN rows first


def test_truncated_response_is_nan_with_note(llama: nn.Module) -> None:
    rows = score_data(llama, LM_DATA[1:3], tokenizer=CharTokenizer(), max_length=20, progress=False)
    assert (
        rows[0]["tokens"] == 0 and "max_length=20" in rows[0]["note"] and math.isnan(rows[0]["summary"]["nuclear_norm"])
    )
    assert rows[1]["note"] is None and rows[1]["tokens"] > 0


def test_bad_inputs(llama: nn.Module, tmp_path: Path) -> None:
    tok = CharTokenizer()
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(LM_DATA[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2: missing key 'response'"):
        score_data(llama, path, tokenizer=tok)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"`data` holds no samples"):
        score_data(llama, tmp_path / "empty.jsonl", tokenizer=tok)
    with pytest.raises(ValueError, match=r"`data` holds no samples"):
        score_data(llama, [], tokenizer=tok)
    with pytest.raises(FileNotFoundError, match=r"`data`: no such file"):
        score_data(llama, tmp_path / "missing.jsonl", tokenizer=tok)
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1, got 0"):
        score_data(llama, LM_DATA, tokenizer=tok, batch_size=0)
    with pytest.raises(ValueError, match=r"`task` can be auto, causal_lm, classification, got 'seq2seq'"):
        score_data(llama, LM_DATA, tokenizer=tok, task="seq2seq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`method` can be factored, reference, got 'svd'"):
        score_data(llama, LM_DATA, tokenizer=tok, method="svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`include` matched no weight \(\['\*\.nothing\.weight'\]\)"):
        score_data(llama, LM_DATA, tokenizer=tok, include=["*.nothing.weight"])
    with pytest.raises(TypeError, match=r"`tokenizer` is required"):
        score_data(llama, LM_DATA)
    with pytest.raises(ValueError, match=r"line 1: 'label' must be a non-negative int, got 'good'"):
        score_data(llama, [{"text": "x", "label": "good"}], tokenizer=tok)
    with pytest.raises(ValueError, match=r"`dtype` can be float32, float64, bfloat16, got 'int8'"):
        score_data(llama, LM_DATA, tokenizer=tok, dtype="int8")
    with pytest.raises(ValueError, match=r"line 1: cannot tell the task"):
        score_data(llama, [{"question": "x"}], tokenizer=tok)
    with pytest.raises(FileNotFoundError, match=r"`model`: no such folder"):
        score_data(tmp_path / "no-model", LM_DATA)
    with pytest.raises(ValueError, match=r"`sort` can be"):
        ranked_table([], sort="nuc")


def test_write_scores_and_table(llama: nn.Module, tmp_path: Path) -> None:
    rows = score_data(llama, LM_DATA, tokenizer=CharTokenizer(), progress=False)
    out = write_scores(rows, tmp_path / "scores.jsonl")
    back = [json.loads(line) for line in out.read_text().splitlines()]
    assert back == rows
    lines = ranked_table(rows, sort="effective_rank", top=3).splitlines()
    assert "ascending" in lines[0] and len(lines) == 5
    ranks = [float(line.split()[-2]) for line in lines[2:]]  # effective_rank column, before top_sv_ratio
    assert ranks == sorted(ranks)
    assert "descending" in ranked_table(rows, sort="nuclear_norm").splitlines()[0]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"needs pyarrow"):
            write_scores(rows, tmp_path / "scores.parquet")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradspectra.cli", "score-data", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_end_to_end(minilm_tokenizer: Any, tmp_path: Path) -> None:
    # a tiny BERT encoder saved without a classification head: score-data adds one (seed 0), sized from the labels
    torch.manual_seed(2)
    config = bert_config(minilm_tokenizer.vocab_size)
    folder = tmp_path / "tiny-bert"
    transformers.BertModel(config).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in TEXT_DATA))
    out = tmp_path / "scores.jsonl"
    done = run_cli(str(folder), str(data), "--out", str(out), "--batch-size", "2", "--no-progress", "--top", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("4 samples, sorted by effective_rank ascending")
    assert len([line for line in lines[2:] if line.strip() and not line.startswith("wrote")]) == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", None, "c", "d"]
    again = score_data(folder, data, progress=False)
    assert_close(rows, again, 1e-6)  # the same seeded head, the same values

    missing = run_cli(str(folder), str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "no such file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_label_outside_the_classifier(bert: nn.Module, minilm_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match=r"`data` has label 5, but `model` has 3 classes"):
        score_data(bert, [{"text": "x", "label": 5}], tokenizer=minilm_tokenizer)


def test_cli_sort_keys_are_the_library_ones() -> None:
    from gradspectra import cli, data_scoring

    assert cli._SORT_KEYS == data_scoring.SORT_KEYS
