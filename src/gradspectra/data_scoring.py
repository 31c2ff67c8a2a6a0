r"""Score every sample of a data set by its own gradient's spectra, as the two papers do, batched.

The papers run one backward per sample at fixed weights and take a full SVD of each watched matrix.
Here one forward and one backward serve a whole batch: the batch loss is the sum of each sample's mean
response-token loss, so sample :math:`i`'s output gradients :math:`\Delta_i` are exactly its own, and its
weight gradient :math:`G_i = \Delta_i^\top X_i` has the singular values of a ``T x T`` core
(:func:`gradspectra.functional.per_sample_metrics`), never formed as an ``m x n`` matrix.
``method="reference"`` is the papers' loop itself, for checking.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from gradspectra.capture.samples import SampleCapture
from gradspectra.capture.selection import select_parameters
from gradspectra.capture.watched import WatchedParameter, group_by_component
from gradspectra.functional.layers import layer_mad
from gradspectra.functional.per_sample import per_sample_metrics
from gradspectra.functional.spectral import METRIC_NAMES, check_metric_names, spectral_metrics

Task = Literal["auto", "causal_lm", "classification"]
TASKS: tuple[str, ...] = get_args(Task)
ScoreMethod = Literal["factored", "reference"]
SCORE_METHODS: tuple[str, ...] = get_args(ScoreMethod)

#: The papers' watched weights: the q/k/v/o attention projections of every layer (Llama-style
#: ``self_attn.{q,k,v,o}_proj``, BERT/MiniLM ``attention.self.{query,key,value}`` and ``attention.output.dense``).
DEFAULT_INCLUDE: tuple[str, ...] = (
    "*.self_attn.q_proj.weight",
    "*.self_attn.k_proj.weight",
    "*.self_attn.v_proj.weight",
    "*.self_attn.o_proj.weight",
    "*.attention.self.query.weight",
    "*.attention.self.key.weight",
    "*.attention.self.value.weight",
    "*.attention.output.dense.weight",
)

#: Sort direction that puts the most suspicious samples first. Paper 2: higher-quality data gives a lower
#: nuclear norm and a higher effective rank; the other norms follow the nuclear norm, the other ranks the
#: effective rank, and a large share of the top singular value is a low rank.
SUSPICIOUS_HIGH: frozenset[str] = frozenset({"nuclear_norm", "spectral_norm", "frobenius_norm", "top_sv_ratio", "loss"})
SORT_KEYS: tuple[str, ...] = (*METRIC_NAMES, "loss")

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
_REQUIRED: dict[str, tuple[str, str]] = {"causal_lm": ("prompt", "response"), "classification": ("text", "label")}


@dataclass
class _Encoded:
    """One tokenized sample: its inputs, the labels of its loss and how many tokens carry that loss."""

    index: int
    id: Any
    inputs: dict[str, list[int]]
    target: list[int] | int  # causal LM: per-token labels (-100 outside the loss); classification: the class
    loss_tokens: int
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- data


def load_data(data: str | os.PathLike[str] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The samples of ``data``: a JSONL file (one JSON object a line, blank lines skipped) or a list of dicts.

    Raises:
        FileNotFoundError: ``data`` names a file that does not exist.
        ValueError: a line that is not a JSON object (with its line number), or no sample at all.
        TypeError: ``data`` is neither a path nor a sequence of dicts.
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"`data`: no such file {str(path)!r}")
        rows: list[dict[str, Any]] = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"`data` {str(path)!r} line {number}: not valid JSON ({err.msg})") from err
                if not isinstance(row, dict):
                    raise ValueError(f"`data` {str(path)!r} line {number}: expected a JSON object, got {row!r}")
                row.setdefault("_line", number)
                rows.append(row)
    elif isinstance(data, Sequence) and not isinstance(data, (bytes, str)):
        rows = []
        for i, row in enumerate(data):
            if not isinstance(row, Mapping):
                raise TypeError(f"`data` item {i} must be a dict, got {row!r}")
            rows.append({**row, "_line": i + 1})
    else:
        raise TypeError(f"`data` must be a JSONL path or a list of dicts, got {type(data).__name__}")
    if not rows:
        raise ValueError(
            f"`data` holds no samples, got {str(data) if isinstance(data, (str, os.PathLike)) else data!r}"
        )
    return rows


def _where(row: Mapping[str, Any]) -> str:
    return f"line {row['_line']}"


def infer_task(rows: Sequence[Mapping[str, Any]], task: str = "auto") -> str:
    """``"causal_lm"`` for ``{"prompt", "response"}`` rows, ``"classification"`` for ``{"text", "label"}`` rows.

    Raises:
        ValueError: an unknown ``task``, or a row without the keys of the task (with its line number).
    """
    if task not in TASKS:
        raise ValueError(f"`task` can be {', '.join(TASKS)}, got {task!r}")
    if task == "auto":
        first = rows[0]
        if "prompt" in first or "response" in first:
            task = "causal_lm"
        elif "text" in first or "label" in first:
            task = "classification"
        else:
            keys = sorted(k for k in first if k != "_line")
            raise ValueError(
                f"`data` {_where(first)}: cannot tell the task from keys {keys}: rows need "
                "'prompt' and 'response' (causal LM) or 'text' and 'label' (classification)"
            )
    need = _REQUIRED[task]
    for row in rows:
        missing = [k for k in need if k not in row]
        if missing:
            keys = sorted(k for k in row if k != "_line")
            raise ValueError(
                f"`data` {_where(row)}: missing key {missing[0]!r} (task {task!r} needs {list(need)}), got keys {keys}"
            )
        for k in need:
            if k != "label" and not isinstance(row[k], str):
                raise ValueError(f"`data` {_where(row)}: {k!r} must be a string, got {row[k]!r}")
        if task == "classification":
            label = row["label"]
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise ValueError(f"`data` {_where(row)}: 'label' must be a non-negative int, got {label!r}")
            if "text_pair" in row and row["text_pair"] is not None and not isinstance(row["text_pair"], str):
                raise ValueError(f"`data` {_where(row)}: 'text_pair' must be a string, got {row['text_pair']!r}")
    return task


def _encode_text(tokenizer: Any, text: str, special: bool) -> list[int]:
    # a transformers tokenizer is called; a minimal one (e.g. the demo's CharTokenizer) only has encode()
    ids = tokenizer(text, add_special_tokens=special)["input_ids"] if callable(tokenizer) else tokenizer.encode(text)
    return [int(i) for i in ids]


def encode(rows: Sequence[Mapping[str, Any]], task: str, tokenizer: Any, max_length: int) -> list[_Encoded]:
    """Tokenize every row: prompt (with special tokens) + response (without) for a causal LM, truncated to
    ``max_length``, the prompt labelled -100; text (and ``text_pair``) for classification."""
    out = []
    for i, row in enumerate(rows):
        if task == "causal_lm":
            p = _encode_text(tokenizer, row["prompt"], True)
            r = _encode_text(tokenizer, row["response"], False)
            ids = (p + r)[:max_length]
            labels = ([-100] * len(p) + r)[:max_length]
            # position t is predicted from position t - 1: the first token can never carry loss
            count = sum(1 for lab in labels[1:] if lab != -100)
            enc = _Encoded(i, row.get("id"), {"input_ids": ids}, labels, count)
            if count == 0:
                enc.notes.append(f"no response token within max_length={max_length}: values are NaN")
        else:
            if not callable(tokenizer):
                raise TypeError("`tokenizer` must be a transformers tokenizer (callable) for text/label data")
            pair = row.get("text_pair")
            got = tokenizer(row["text"], pair, truncation=True, max_length=max_length)
            inputs = {k: [int(v) for v in got[k]] for k in ("input_ids", "token_type_ids") if k in got}
            enc = _Encoded(i, row.get("id"), inputs, int(row["label"]), 1)
        out.append(enc)
    return out


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def collate(samples: Sequence[_Encoded], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """Right-padded tensors: ``input_ids``, ``attention_mask`` (and ``token_type_ids``), and ``target``.

    Padding goes on the right so that every real token keeps its position ids; it is masked out of attention
    and labelled -100, so it carries zero output gradient.
    """
    length = max(len(s.inputs["input_ids"]) for s in samples)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
    targets: list[Any] = []
    for s in samples:
        n = len(s.inputs["input_ids"])
        pad = length - n
        batch["input_ids"].append(s.inputs["input_ids"] + [pad_id] * pad)
        batch["attention_mask"].append([1] * n + [0] * pad)
        if "token_type_ids" in s.inputs:
            batch.setdefault("token_type_ids", []).append(s.inputs["token_type_ids"] + [0] * pad)
        targets.append(s.target + [-100] * pad if isinstance(s.target, list) else s.target)
    out = {k: torch.tensor(v, device=device) for k, v in batch.items()}
    out["target"] = torch.tensor(targets, device=device)
    return out


# --------------------------------------------------------------------------------------------- model


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"`model` must return logits (a Tensor or an output with `.logits`), got {type(output).__name__}")


def per_sample_loss(model: nn.Module, batch: Mapping[str, Tensor], task: str) -> Tensor:
    """``(B,)`` each sample's loss: the mean cross-entropy over its response tokens (causal LM), else its class's.

    A sample without loss tokens gets 0 here (its row is reported as NaN by the caller).
    """
    kwargs = {k: v for k, v in batch.items() if k != "target"}
    logits = _logits(model(**kwargs))
    if logits.dtype in (torch.float16, torch.bfloat16):
        # the loss in at least float32, as transformers does; the gradient flows back in the model's dtype
        logits = logits.float()
    target = batch["target"]
    if task == "classification":
        return nn.functional.cross_entropy(logits, target, reduction="none")
    labels = target[:, 1:]
    ce = nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    count = (labels != -100).sum(1)
    return ce.sum(1) / count.clamp_min(1).to(ce.dtype)


def _check_positive(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return value


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"`dtype` can be {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(path: str | os.PathLike[str], task: str, num_labels: int) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local folder: a causal LM, or a sequence classifier with ``num_labels`` classes.

    A checkpoint without a trained classification head gets a new one, initialised from a fixed seed so
    that two runs give the same scores.
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"`model`: no such folder {str(path)!r}")
    try:
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("loading `model` from a path needs transformers: pip install 'gradspectra[hf]'") from err
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if task == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(str(folder))
        else:
            config = AutoConfig.from_pretrained(str(folder))
            trained = any("ForSequenceClassification" in a for a in (config.architectures or []))
            if trained:
                model = AutoModelForSequenceClassification.from_pretrained(str(folder))
                if num_labels > model.config.num_labels:
                    raise ValueError(
                        f"`data` has labels up to {num_labels - 1}, but the classifier at {str(path)!r} "
                        f"has {model.config.num_labels} classes"
                    )
            else:
                model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels)
    return model, tokenizer


def watched_weights(model: nn.Module, include: str | Sequence[str] | None) -> list[WatchedParameter]:
    """The weights to measure: ``include`` globs, else :data:`DEFAULT_INCLUDE` (the q/k/v/o projections).

    Raises:
        ValueError: nothing matched (the message lists what the model has).
    """
    selection = select_parameters(model, include=include if include is not None else DEFAULT_INCLUDE)
    if not selection.watched:
        hint = "" if include is not None else " GPT-2 style fused attention (Conv1D c_attn) is not watched by default;"
        raise ValueError(
            f"`include` matched no weight ({include if include is not None else list(DEFAULT_INCLUDE)!r}).{hint} "
            + selection.describe_empty(model)
        )
    return selection.watched


# ------------------------------------------------------------------------------------------ measuring


def _factored_batch(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    task: str,
    watched: Sequence[WatchedParameter],
    capture: SampleCapture,
    names: tuple[str, ...],
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(loss (B,), {metric: (len(watched), B)})`` for one padded batch: one forward, one backward."""
    capture.clear()
    # each watched layer's input, kept to ask autograd for: the gradient of a layer's input needs its output
    # gradient (which the capture's hooks see) but no weight gradient at all, so none is computed
    seen: dict[int, Tensor] = {}

    def keep_input(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if inputs and isinstance(inputs[0], Tensor) and inputs[0].requires_grad:
            seen.setdefault(id(module), inputs[0])

    handles = [w.module.register_forward_pre_hook(keep_input) for w in watched if w.module is not None]
    try:
        loss = per_sample_loss(model, batch, task)
    finally:
        for handle in handles:
            handle.remove()
    target = batch["target"]
    count = (target[:, 1:] != -100).sum(1) if task == "causal_lm" else torch.ones_like(loss, dtype=torch.long)
    keep = torch.isfinite(loss) & (count > 0)
    # the sum over samples: sample i's output gradients are exactly those of its own mean loss; a sample
    # with a non-finite loss is left out of the sum so that it cannot reach the others through it
    total = torch.where(keep, loss, torch.zeros_like(loss)).sum()
    wanted: dict[int, Tensor] = {}
    for w in watched:
        x = seen.get(id(w.module))
        # a layer whose input needs no gradient (frozen below it) is reached through its weight instead
        chosen = x if x is not None else w.param
        wanted.setdefault(id(chosen), chosen)
    torch.autograd.grad(total, list(wanted.values()), allow_unused=True)
    mask = batch["attention_mask"].to(torch.bool)
    factors = []
    for i in range(len(watched)):
        parts = capture.factors(i)
        if len(parts) != 1:
            raise RuntimeError(
                f"{len(parts)} sets of per-sample factors were captured for {watched[i].name!r} in this batch, "
                "expected 1 (one forward of the layer per batch)"
            )
        d, x = parts[0]
        if d.shape[:2] != mask.shape:
            raise RuntimeError(
                f"{watched[i].name!r} sees inputs of shape {tuple(x.shape)}, not (batch, tokens, features) "
                f"of the batch {tuple(mask.shape)}: per-sample factors cannot be read"
            )
        # padding carries no gradient in a model that masks it; zeroing it makes that exact and explicit
        factors.append((d * mask[..., None].to(d.dtype), x))
    b = mask.shape[0]
    out = {name: torch.empty(len(watched), b, dtype=torch.float64) for name in names}
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (d, x) in enumerate(factors):
        groups.setdefault((*d.shape, x.shape[-1]), []).append(i)
    for idx in groups.values():
        # same-shaped layers in one call: on a small model the per-call cost is most of the time
        d = torch.cat([factors[i][0] for i in idx])
        x = torch.cat([factors[i][1] for i in idx])
        values = per_sample_metrics(d, x, names)
        for name in names:
            out[name][idx] = values[name].view(len(idx), b).cpu()
    capture.clear()
    return loss.detach().double().cpu(), out


def _reference_sample(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    task: str,
    watched: Sequence[WatchedParameter],
    names: tuple[str, ...],
) -> tuple[Tensor, dict[str, Tensor]]:
    """The papers' method for one sample: one backward, read ``.grad``, full float64 SVD of each matrix."""
    model.zero_grad(set_to_none=True)
    loss = per_sample_loss(model, batch, task)
    loss.sum().backward()  # type: ignore[no-untyped-call]
    out = {name: torch.empty(len(watched), 1, dtype=torch.float64) for name in names}
    for i, w in enumerate(watched):
        g = w.grad_matrix()
        if g is None:
            g = torch.zeros_like(w.param)
        # a full float64 SVD of the matrix (NaN metrics for a non-finite gradient, never a LAPACK error)
        values = spectral_metrics(g.detach(), names, method="svd")
        for name in names:
            out[name][i, 0] = values[name].cpu()
    model.zero_grad(set_to_none=True)
    return loss.detach().double().cpu(), out


def _batches(samples: Sequence[_Encoded], size: int) -> Iterator[list[_Encoded]]:
    # similar lengths together: the padded batch is as long as its longest sample
    ordered = sorted(samples, key=lambda s: len(s.inputs["input_ids"]))
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:  # the bar is optional
        return None
    return tqdm(total=total, file=sys.stderr, unit="sample", desc="score-data")


def _rows(
    chunk: Sequence[_Encoded],
    loss: Tensor,
    values: Mapping[str, Tensor],
    keys: Sequence[str],
    curves: Sequence[Sequence[int]],
) -> list[dict[str, Any]]:
    """The output rows of one batch; ``values[metric]`` is ``(len(keys), B)``, one row per watched matrix.

    Summaries and MADs are taken on whole tensors (one call per component, not per sample): on a small model
    the Python work per sample would otherwise cost as much as the spectra.
    """
    names = list(values)
    table = torch.stack([values[n] for n in names])  # (metric, layer, sample)
    bad_layer = ~torch.isfinite(table).all(0)  # a matrix with a non-finite gradient: all its metrics NaN
    skipped = torch.tensor([bool(s.notes) for s in chunk]) | ~torch.isfinite(loss)
    table = torch.where(bad_layer[None] | skipped[None, None], torch.full_like(table, math.nan), table)
    summary = table.mean(1)  # (metric, sample)
    if curves:
        mad = torch.stack([layer_mad(table[:, idx].transpose(1, 2)) for idx in curves]).mean(0)
    else:
        mad = torch.full_like(summary, math.nan)
    per_layer = table.permute(2, 1, 0).tolist()  # sample -> layer -> metric
    summaries, mads = summary.T.tolist(), mad.T.tolist()
    losses, bad_counts = loss.tolist(), bad_layer.sum(0).tolist()
    rows = []
    for k, sample in enumerate(chunk):
        notes = list(sample.notes)
        if not notes and not math.isfinite(losses[k]):
            notes.append(f"non-finite loss ({losses[k]}): values are NaN")
        elif not notes and bad_counts[k]:
            notes.append(f"non-finite gradient in {bad_counts[k]} of {len(keys)} matrices: their values are NaN")
        rows.append(
            {
                "index": sample.index,
                "id": sample.id,
                "tokens": sample.loss_tokens,
                "length": len(sample.inputs["input_ids"]),
                "loss": math.nan if sample.notes else losses[k],
                "layers": {key: dict(zip(names, v)) for key, v in zip(keys, per_layer[k])},
                "summary": dict(zip(names, summaries[k])),
                "mad": dict(zip(names, mads[k])),
                "note": "; ".join(notes) if notes else None,
            }
        )
    return rows


def score_data(
    model: nn.Module | str | os.PathLike[str],
    data: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    *,
    tokenizer: Any = None,
    task: Task = "auto",
    batch_size: int = 16,
    max_length: int = 512,
    include: str | Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    method: ScoreMethod = "factored",
    progress: bool = True,
) -> list[dict[str, Any]]:
    r"""Every sample's per-layer gradient spectra at fixed weights, as the two papers measure them.

    Each sample's loss is the mean cross-entropy over its response tokens (prompt labelled -100) for
    ``{"prompt", "response"}`` rows, or the cross-entropy of its label for ``{"text", "label"}`` rows
    (optional ``"text_pair"``); any row may carry an ``"id"``. The model runs in eval mode and is never
    stepped. For each watched weight, sample :math:`i`'s gradient is :math:`G_i = \Delta_i^\top X_i`
    (its tokens' output gradients and inputs); ``method="factored"`` gets its singular values from a
    ``T x T`` core per sample in float64, from one forward and one backward per batch in which the loss
    is the sum of the samples' losses; ``method="reference"`` runs the papers' loop (batch size 1, one
    backward, ``.grad``, :func:`torch.linalg.svdvals` of each matrix in float64). Both give the same values
    (to rounding in the model's dtype); the factored route is tens of times faster.

    Args:
        model: a local folder loaded with ``transformers`` (``AutoModelForCausalLM`` for prompt/response data,
            ``AutoModelForSequenceClassification`` for text/label data, its head sized from the labels when
            the checkpoint has none, initialised from seed 0), or a built ``nn.Module`` called as
            ``model(input_ids=, attention_mask=[, token_type_ids=])`` that returns logits (or an output with
            ``.logits``); a module is put in eval mode for the run (and restored), and moved / cast in place
            when ``device`` / ``dtype`` are given.
        data: a JSONL path or a list of dicts (see above).
        tokenizer: required with a built module: a ``transformers`` tokenizer, or for prompt/response data any
            object with ``encode(text) -> list[int]``. Loaded from ``model`` when that is a path.
        task: ``"auto"`` (from the first row's keys), ``"causal_lm"`` or ``"classification"``.
        batch_size: samples per forward/backward (factored route; the reference always uses 1).
        max_length: tokens kept per sample (prompt + response, truncated at the end).
        include: ``fnmatch`` globs on parameter names; default :data:`DEFAULT_INCLUDE`.
        metrics: names from :data:`gradspectra.functional.METRIC_NAMES`; ``None`` means all.
        device: where to run; default the module's device (a path: CUDA when available, else CPU).
        dtype: ``"float32"``, ``"float64"``, ``"bfloat16"`` or a ``torch.dtype``; default the model's.
        method: ``"factored"`` or ``"reference"``.
        progress: show a tqdm bar on stderr (when tqdm is installed).

    Returns:
        One dict per sample, in the order of ``data``: ``index`` (0-based position), ``id`` (the row's
        ``"id"`` or ``None``), ``tokens`` (tokens that carry loss: response tokens, 1 for classification),
        ``length`` (input tokens), ``loss``, ``layers`` (``{key: {metric: value}}``, keys like
        ``"self_attn.q_proj/layer_00"``), ``summary`` (``{metric: mean over layers}``), ``mad``
        (``{metric: paper 1's mean absolute difference between adjacent layers of this sample's curve,
        averaged over the components (q, k, v, o)}``) and ``note`` (``None``, or why values are NaN).

    Raises:
        FileNotFoundError: ``model`` or ``data`` names a path that does not exist.
        ValueError: empty data, a row without its task's keys (with its line number), ``batch_size`` or
            ``max_length`` not a positive int, an unknown ``task``/``method``/``dtype``/metric, or no weight
            matched.
        TypeError: ``model`` is neither a path nor an ``nn.Module``, or a module came without ``tokenizer``.
    """
    _check_positive(batch_size, "batch_size")
    _check_positive(max_length, "max_length", 2)
    if method not in SCORE_METHODS:
        raise ValueError(f"`method` can be {', '.join(SCORE_METHODS)}, got {method!r}")
    if task not in TASKS:
        raise ValueError(f"`task` can be {', '.join(TASKS)}, got {task!r}")
    names = check_metric_names(metrics)
    want_dtype = _resolve_dtype(dtype)
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise TypeError("`tokenizer` is required when `model` is an nn.Module, got None")
    elif not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"`model` must be a local folder path or an nn.Module, got {type(model).__name__}")
    rows = load_data(data)
    task = infer_task(rows, task)  # type: ignore[assignment]
    if not isinstance(model, nn.Module):
        num_labels = max(2, 1 + max(int(r["label"]) for r in rows)) if task == "classification" else 0
        model, loaded = load_model(model, task, num_labels)
        tokenizer = tokenizer if tokenizer is not None else loaded
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    if device is not None:
        model.to(torch.device(device))
    if want_dtype is not None:
        model.to(want_dtype)
    classes = getattr(getattr(model, "config", None), "num_labels", None)
    if task == "classification" and isinstance(classes, int):
        top = max(int(r["label"]) for r in rows)
        if top >= classes:
            raise ValueError(f"`data` has label {top}, but `model` has {classes} classes (labels 0..{classes - 1})")
    first = next(model.parameters(), None)
    run_device = first.device if first is not None else torch.device("cpu")
    watched = watched_weights(model, include)
    if method == "factored":
        odd = [w.name for w in watched if not isinstance(w.module, nn.Linear)]
        if odd:
            raise ValueError(
                f"method='factored' reads per-sample factors of nn.Linear layers only; `include` matched "
                f"{odd[:4]} (e.g. GPT-2 Conv1D): pass method='reference' or other `include` globs"
            )
    keys = [w.key for w in watched]
    position = {id(w): j for j, w in enumerate(watched)}
    # paper 1's MAD runs along the layers of one component (q, k, v, o): those with a layer index
    curves = [
        [position[id(w)] for w in group]
        for group in group_by_component(watched).values()
        if len(group) > 1 and all(w.index is not None for w in group)
    ]
    samples = encode(rows, task, tokenizer, max_length)
    pad_id = _pad_id(tokenizer)
    results: dict[int, dict[str, Any]] = {}
    was_training = model.training
    model.eval()
    bar = _progress(len(samples), progress)
    capture = SampleCapture(watched) if method == "factored" else None
    # the reference reads `.grad`: the model's own gradients are put back afterwards
    saved = [(p, p.grad) for p in model.parameters()] if method == "reference" else []
    try:
        for chunk in _batches(samples, batch_size if method == "factored" else 1):
            batch = collate(chunk, pad_id, run_device)
            if capture is not None:
                loss, values = _factored_batch(model, batch, task, watched, capture, names)
            else:
                loss, values = _reference_sample(model, batch, task, watched, names)
            for row in _rows(chunk, loss, values, keys, curves):
                results[row["index"]] = row
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if capture is not None:
            capture.close()
        for param, grad in saved:
            param.grad = grad
        model.train(was_training)
        if bar is not None:
            bar.close()
    return [results[i] for i in range(len(samples))]


# -------------------------------------------------------------------------------------------- output


def flat_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One row as flat columns: ``index, id, tokens, length, loss, note``, ``summary/<metric>``,
    ``mad/<metric>`` and ``<metric>/<key>`` (the TensorBoard tag order) for each layer."""
    out: dict[str, Any] = {k: row[k] for k in ("index", "id", "tokens", "length", "loss", "note")}
    out["id"] = None if row["id"] is None else str(row["id"])
    for part in ("summary", "mad"):
        out.update({f"{part}/{m}": v for m, v in row[part].items()})
    for key, values in row["layers"].items():
        out.update({f"{m}/{key}": v for m, v in values.items()})
    return out


def write_scores(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write ``rows`` to ``path``: JSONL (one row a line, NaN written as ``NaN``), or Parquet (flat columns,
    see :func:`flat_row`) when the name ends in ``.parquet``.

    Raises:
        ImportError: a ``.parquet`` path without pyarrow installed.
    """
    target = Path(path)
    if target.suffix == ".parquet":
        try:
            import pyarrow as pa  # type: ignore[import-not-found]
            import pyarrow.parquet as pq  # type: ignore[import-not-found]
        except ImportError as err:
            raise ImportError(
                f"writing {str(target)!r} as Parquet needs pyarrow (pip install pyarrow); or use a .jsonl path"
            ) from err
        pq.write_table(pa.Table.from_pylist([flat_row(r) for r in rows]), str(target))
        return target
    with target.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return target


def _sort_value(row: Mapping[str, Any], sort: str) -> float:
    value = row["loss"] if sort == "loss" else row["summary"].get(sort, math.nan)
    return float(value) if value is not None else math.nan


def ranked_table(rows: Iterable[Mapping[str, Any]], sort: str = "effective_rank", top: int | None = 20) -> str:
    """A text table of the most suspicious samples first.

    Paper 2: higher-quality data gives a lower nuclear norm and a higher effective rank. So the default,
    ``sort="effective_rank"``, is ascending (lowest effective rank first); the norms and ``top_sv_ratio`` (and
    ``"loss"``) sort descending, the other ranks ascending. Rows with NaN values come first. The columns are the
    summary (mean over layers) values.

    Raises:
        ValueError: an unknown ``sort`` or a ``top`` that is not a positive int.
    """
    if sort not in SORT_KEYS:
        raise ValueError(f"`sort` can be {', '.join(SORT_KEYS)}, got {sort!r}")
    if top is not None:
        _check_positive(top, "top")
    items = list(rows)
    high = sort in SUSPICIOUS_HIGH

    def key(row: Mapping[str, Any]) -> tuple[bool, float]:
        v = _sort_value(row, sort)
        return (not math.isnan(v), -v if high else v)

    ranked = sorted(items, key=key)[: top if top is not None else len(items)]
    shown = [m for m in ("nuclear_norm", "effective_rank", "top_sv_ratio") if items and m in items[0]["summary"]]
    if sort != "loss" and sort not in shown:
        shown.append(sort)
    header = ["rank", "index", "id", "tokens", "loss", *shown, "note"]
    table = [header]
    for r, row in enumerate(ranked, start=1):
        cells = [str(r), str(row["index"]), "" if row["id"] is None else str(row["id"]), str(row["tokens"])]
        cells.append(f"{row['loss']:.4g}")
        cells += [f"{row['summary'][m]:.4g}" for m in shown]
        cells.append(row["note"] or "")
        table.append(cells)
    widths = [max(len(line[c]) for line in table) for c in range(len(header) - 1)]
    lines = [
        f"{len(items)} samples, sorted by {sort} {'descending' if high else 'ascending'}: most suspicious first "
        "(papers: higher quality = lower nuclear norm, higher effective rank); values are means over layers"
    ]
    for line in table:
        lines.append("  ".join(c.rjust(w) for c, w in zip(line[:-1], widths)) + ("  " + line[-1] if line[-1] else ""))
    return "\n".join(lines)
