"""SampleCapture: the factors it keeps give every sample's gradient, checked against one backward per sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradspectra.capture import SampleCapture, select_parameters
from gradspectra.functional import METRIC_NAMES, per_sample_metrics
from reference import assert_metric_close, ref_metrics


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config).double().eval()  # eval: no dropout, per-sample exact


def batch(b: int = 5, t: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for i in range(b):
        mask[i, 3 + (i * 2) % (t - 3) :] = 0  # right padding of different lengths
    return ids, mask, torch.randint(0, 3, (b,), generator=g)


def sample_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits
    return nn.functional.cross_entropy(logits, labels, reduction="sum")  # each sample's own loss, added


def per_sample_reference(model: nn.Module, watched: list, ids, mask, labels) -> list[dict[str, np.ndarray]]:
    """One backward per sample, its unpadded tokens only; every watched gradient formed and decomposed in numpy."""
    out = []
    for i in range(ids.shape[0]):
        model.zero_grad()
        n = int(mask[i].sum())
        sample_loss(model, ids[i : i + 1, :n], mask[i : i + 1, :n], labels[i : i + 1]).backward()
        out.append({w.key: w.grad_matrix().detach().numpy().copy() for w in watched})
    model.zero_grad()
    return out


def test_every_sample_metric_equals_a_backward_per_sample() -> None:
    model = tiny_bert()
    watched = select_parameters(model, include="*.encoder.*").watched
    capture = SampleCapture(watched)
    assert capture.layers == list(range(len(watched)))
    ids, mask, labels = batch()
    capture.enabled = False
    reference = per_sample_reference(model, watched, ids, mask, labels)
    capture.enabled = True
    sample_loss(model, ids, mask, labels).backward()
    sample_loss(model, ids, mask, labels).backward()  # accumulation: a second micro-batch (the same samples)
    for row, w in enumerate(watched):
        parts = capture.factors(row)
        assert len(parts) == 2  # two forwards before any clear(): two micro-batches of the same samples
        delta, inputs = parts[1]
        assert capture.check(row, w.grad_matrix()) == pytest.approx(1.0, rel=1e-6)  # both micro-batches: .grad
        assert capture.check(row, w.grad_matrix() / 2) == pytest.approx(0.5, rel=1e-6)  # clipped by half
        got = per_sample_metrics(delta, inputs)
        for i in range(ids.shape[0]):
            want = ref_metrics(reference[i][w.key])
            for name in METRIC_NAMES:
                assert_metric_close(name, float(got[name][i]), want[name], context=(w.key, i))
    capture.close()


def test_micro_batches_are_new_samples_and_clear_releases_them() -> None:
    lin = nn.Linear(6, 4)
    (w,) = select_parameters(nn.Sequential(lin), include="*.weight").watched
    capture = SampleCapture([w])
    x1, x2 = torch.randn(3, 5, 6), torch.randn(2, 5, 6)
    lin(x1).square().sum().backward()
    lin(x2).square().sum().backward()  # accumulation: another micro-batch
    parts = capture.factors(0)
    assert [tuple(d.shape) for d, _ in parts] == [(3, 5, 4), (2, 5, 4)]
    assert capture.check(0, w.grad_matrix()) == pytest.approx(1.0, rel=1e-5)
    capture.clear()
    assert capture.factors(0) == []
    capture.enabled = False
    lin(x1).sum().backward()
    assert capture.factors(0) == []
    capture.close()


def test_a_layer_called_twice_in_one_forward_joins_the_tokens() -> None:
    lin = nn.Linear(4, 4)
    (w,) = select_parameters(nn.Sequential(lin), include="*.weight").watched
    capture = SampleCapture([w])
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    lin.double()
    lin(lin(x)).sum().backward()  # one micro-batch, the layer used twice: each sample's gradient is the sum
    ((d, inputs),) = capture.factors(0)
    assert d.shape == (3, 4, 4)
    per_sample = []
    for i in range(3):
        lin.zero_grad()
        lin(lin(x[i : i + 1])).sum().backward()
        per_sample.append(lin.weight.grad.clone())
    got = per_sample_metrics(d, inputs)
    for i, g in enumerate(per_sample):
        assert float(got["nuclear_norm"][i]) == pytest.approx(ref_metrics(g.numpy())["nuclear_norm"], rel=1e-9)
    capture.close()


def test_check_gives_the_multiple_or_none_when_the_gradient_is_something_else() -> None:
    lin = nn.Linear(5, 3)
    (w,) = select_parameters(nn.Sequential(lin), include="*.weight").watched
    capture = SampleCapture([w])
    lin(torch.randn(4, 5)).square().sum().backward()
    grad = w.grad_matrix()
    assert capture.check(0, grad) == pytest.approx(1.0, rel=1e-5)
    assert capture.check(0, grad * 0.25) == pytest.approx(0.25, rel=1e-5)  # clipping, or 1 / an AMP loss scale
    other = grad + 0.5 * grad.abs().max() * torch.randn(grad.shape, generator=torch.Generator().manual_seed(1))
    assert capture.check(0, other) is None  # e.g. a user's gradient hook: not a multiple
    assert capture.check(0, -grad) is None
    nan = grad.clone()
    nan[0, 0] = float("nan")
    assert np.isnan(capture.check(0, nan))  # a non-finite gradient: nothing to compare, said so
    capture.close()
    assert capture.factors(0) == []


def test_gradients_of_a_graph_built_before_clear_are_ignored() -> None:
    lin = nn.Linear(5, 3)
    (w,) = select_parameters(nn.Sequential(lin), include="*.weight").watched
    capture = SampleCapture([w])
    old = lin(torch.randn(4, 5)).sum()  # e.g. another optimizer's loss, built before this step ends
    capture.clear()
    old.backward()  # must neither fail nor land in the new step
    assert capture.factors(0) == []
    lin(torch.randn(2, 5)).sum().backward()
    assert [tuple(d.shape) for d, _ in capture.factors(0)] == [(2, 1, 3)]
    capture.close()


def test_kept_bytes_counts_each_storage_once() -> None:
    lin = nn.Linear(6, 4)
    (w,) = select_parameters(nn.Sequential(lin), include="*.weight").watched
    capture = SampleCapture([w])
    assert capture.kept_bytes() == 0
    lin(torch.randn(3, 5, 6)).square().sum().backward()
    assert capture.kept_bytes() == (3 * 5 * 6 + 3 * 5 * 4) * 4  # float32 inputs and output gradients
    capture.clear()
    assert capture.kept_bytes() == 0
    capture.close()
