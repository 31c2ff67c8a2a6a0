"""FactorCapture: the kept (Delta, X) reproduce the weight gradient, or are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradspectra.capture import FactorCapture, WatchedParameter
from gradspectra.functional import factored_singular_values


def _watch(lin: nn.Linear, name: str = "fc") -> WatchedParameter:
    return WatchedParameter(f"{name}.weight", name, None, name, lin.weight, lin)


def _svd64(g: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(g.detach().double().numpy(), compute_uv=False)


def _assert_same_spectrum(got: np.ndarray, want: np.ndarray) -> None:
    """Equal where the float32 gradient resolves a value (above 1e-5 s_1), both at rounding level below."""
    big = want > 1e-5 * want[0]
    np.testing.assert_allclose(got[: big.sum()], want[big], rtol=1e-5)
    assert np.all(got[big.sum() :] <= 1e-5 * want[0]) and np.all(want[~big] <= 1e-5 * want[0])


def test_padding_rows_are_dropped_and_the_spectrum_is_exact() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    capture = FactorCapture([_watch(lin)])
    x = torch.randn(3, 10, 48)
    mask = torch.zeros(3, 10)
    mask[:, :4] = 1.0  # 4 real tokens per sequence, 6 padding ones without gradient
    (lin(x) * mask[..., None]).pow(2).sum().backward()
    assert capture.tokens(0) == 30  # rows kept by reference; padding is dropped when asked for
    factors = capture.factors(0, lin.weight.grad)
    assert factors is not None
    delta, inputs = factors
    assert delta.shape == (12, 40) and inputs.shape == (12, 48)
    _assert_same_spectrum(factored_singular_values(delta, inputs).numpy(), _svd64(lin.weight.grad))
    capture.close()


def test_micro_batches_and_a_module_called_twice_add_up() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(32, 32)
    capture = FactorCapture([_watch(lin)])
    for _ in range(2):  # gradient accumulation over two micro-batches
        x = torch.randn(5, 32)
        lin(torch.tanh(lin(x))).sum().backward()  # the same weight used twice per forward
    assert capture.tokens(0) == 20
    factors = capture.factors(0, lin.weight.grad)
    assert factors is not None
    _assert_same_spectrum(factored_singular_values(*factors).numpy(), _svd64(lin.weight.grad))
    capture.close()


def test_too_many_tokens_drops_the_rows() -> None:
    lin = nn.Linear(16, 8)
    capture = FactorCapture([_watch(lin)])
    lin(torch.randn(9, 16)).sum().backward()  # 9 tokens >= min(8, 16), none of them padding
    assert capture.factors(0, lin.weight.grad) is None
    capture.close()


@pytest.mark.parametrize("tamper", ["scaled", "replaced"])
def test_factors_that_do_not_reproduce_the_gradient_are_refused(tamper: str) -> None:
    # what DDP averaging, AMP loss scaling or a user's gradient hook do to the gradient
    torch.manual_seed(2)
    lin = nn.Linear(32, 24)
    capture = FactorCapture([_watch(lin)])
    lin(torch.randn(6, 32)).sum().backward()
    grad = lin.weight.grad
    assert capture.factors(0, grad) is not None
    tampered = grad * 2.0 if tamper == "scaled" else torch.randn_like(grad)
    assert capture.factors(0, tampered) is None
    capture.close()


def test_no_grad_forward_keeps_nothing_and_clear_forgets() -> None:
    lin = nn.Linear(16, 16)
    capture = FactorCapture([_watch(lin)])
    with torch.no_grad():
        lin(torch.randn(4, 16))
    assert capture.tokens(0) is None
    lin(torch.randn(4, 16)).sum().backward()
    assert capture.tokens(0) == 4
    capture.clear()
    assert capture.tokens(0) is None
    capture.close()
    lin(torch.randn(4, 16)).sum().backward()  # hooks removed: nothing kept any more
    assert capture.tokens(0) is None


def test_only_linear_weights_get_hooks() -> None:
    conv = nn.Conv2d(3, 4, 3)
    lin = nn.Linear(8, 8)
    watched = [
        WatchedParameter("conv.weight", "conv", None, "conv", conv.weight, conv),
        _watch(lin),
        WatchedParameter("fc.bias", "fc", None, "fc", lin.bias, lin),
    ]
    capture = FactorCapture(watched)
    assert capture.layers == [1]
    capture.close()


def test_only_active_layers_keep_factors() -> None:
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    capture = FactorCapture([_watch(a, "a"), _watch(b, "b")])
    capture.active = {1}
    b(a(torch.randn(4, 16))).sum().backward()
    assert capture.tokens(0) is None
    assert capture.tokens(1) == 4
    assert capture.factors(1, b.weight.grad) is not None
    capture.close()
