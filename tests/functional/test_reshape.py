"""How each kind of weight gradient becomes the ``out x in`` matrix whose spectrum is measured."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from gradspectra.functional import as_matrix, is_conv1d, singular_values


def _grad_like(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))


def test_linear_is_used_as_is() -> None:
    lin = nn.Linear(5, 3)
    g = _grad_like(lin)
    out = as_matrix(g, lin)
    assert out is g
    assert as_matrix(g) is g


@pytest.mark.parametrize(
    ("conv", "rows", "cols"),
    [
        (nn.Conv2d(3, 8, (5, 4)), 8, 3 * 5 * 4),
        (nn.Conv1d(4, 6, 3), 6, 4 * 3),
        (nn.Conv3d(2, 5, (1, 2, 3)), 5, 2 * 1 * 2 * 3),
        (nn.Conv2d(4, 6, 3, groups=2), 6, 2 * 3 * 3),
    ],
)
def test_convolutions_are_out_by_in_times_kernel(conv: nn.Module, rows: int, cols: int) -> None:
    g = _grad_like(conv)
    out = as_matrix(g, conv)
    assert out is not None
    assert out.shape == (rows, cols)
    # row o is output channel o's whole kernel, (in, k...) flattened in memory order
    for o in range(rows):
        torch.testing.assert_close(out[o], g[o].reshape(-1), rtol=0, atol=0)
    # no module needed for an ordinary conv weight
    assert as_matrix(g) is not None
    torch.testing.assert_close(as_matrix(g), out, rtol=0, atol=0)


def _transposed_reference(g: torch.Tensor, groups: int) -> np.ndarray:
    """Row for output channel o: the kernels of o's input channels, as a loop over the stored layout."""
    w = g.numpy()
    n_in, out_per_group = w.shape[0], w.shape[1]
    in_per_group = n_in // groups
    rows = []
    for o in range(out_per_group * groups):
        grp, j = divmod(o, out_per_group)
        rows.append(np.concatenate([w[grp * in_per_group + i, j].ravel() for i in range(in_per_group)]))
    return np.stack(rows)


@pytest.mark.parametrize(
    "conv",
    [
        nn.ConvTranspose2d(3, 8, (5, 4)),
        nn.ConvTranspose1d(4, 6, 3),
        nn.ConvTranspose3d(2, 5, (1, 2, 2)),
        nn.ConvTranspose2d(4, 6, 3, groups=2),
        nn.ConvTranspose1d(6, 9, 2, groups=3),
    ],
)
def test_transposed_convolutions_put_out_first(conv: nn.Module) -> None:
    g = _grad_like(conv)
    out = as_matrix(g, conv)
    assert out is not None
    groups = int(conv.groups)  # type: ignore[arg-type]
    n_out = int(conv.out_channels)  # type: ignore[arg-type]
    n_in = int(conv.in_channels)  # type: ignore[arg-type]
    kernel = int(np.prod(conv.kernel_size))  # type: ignore[arg-type]
    assert out.shape == (n_out, n_in // groups * kernel)
    np.testing.assert_array_equal(out.numpy(), _transposed_reference(g, groups))


def test_gpt2_conv1d_is_transposed_to_out_by_in() -> None:
    layer = Conv1D(nf=6, nx=4)  # stored in x out = 4 x 6
    g = _grad_like(layer)
    assert g.shape == (4, 6)
    assert is_conv1d(layer)
    out = as_matrix(g, layer)
    assert out is not None
    assert out.shape == (6, 4)
    torch.testing.assert_close(out, g.T, rtol=0, atol=0)
    # same spectrum as the equivalent nn.Linear
    lin = nn.Linear(4, 6)
    lin_out = as_matrix(g.T.contiguous(), lin)
    assert lin_out is not None
    torch.testing.assert_close(singular_values(out), singular_values(lin_out), rtol=1e-12, atol=1e-14)


def test_conv1d_detection_does_not_catch_other_modules() -> None:
    assert not is_conv1d(None)
    assert not is_conv1d(nn.Linear(2, 3))
    assert not is_conv1d(nn.Conv1d(2, 3, 1))

    class Conv1D(nn.Module):  # same name, no `nf`: not GPT-2's
        pass

    assert not is_conv1d(Conv1D())


@pytest.mark.parametrize("shape", [(5,), ()])
def test_vectors_and_scalars_are_not_measured(shape: tuple[int, ...]) -> None:
    assert as_matrix(torch.ones(shape)) is None
    assert as_matrix(torch.ones(shape), nn.LayerNorm(5)) is None


@pytest.mark.parametrize("module", [nn.Embedding(10, 4), nn.EmbeddingBag(10, 4)])
def test_embeddings_only_when_asked(module: nn.Module) -> None:
    g = _grad_like(module)
    assert as_matrix(g, module) is None
    out = as_matrix(g, module, include_embeddings=True)
    assert out is g
