"""Selection on plain torch models (convolutions, Sequential), argument checks and the lazy transformers import."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from gradspectra.capture import DEFAULT_MODULE_TYPES, Selection, WatchedParameter, select_parameters


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, groups=2, bias=False), nn.ReLU()),
        )
        self.up = nn.ConvTranspose2d(16, 4, 2, stride=2)
        self.temporal = nn.Conv1d(4, 6, 5)
        self.classifier = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.features(x))  # (B, 4, 12, 12)
        x = self.temporal(x.flatten(2)).mean(-1)
        return self.classifier(x)


def test_conv_net_selection_and_shapes() -> None:
    torch.manual_seed(0)
    model = ConvNet()
    watched = select_parameters(model).watched
    assert [(w.name, w.index, w.key) for w in watched] == [
        # 3 -> 8 and 8 -> 16 (grouped): not repeated blocks, so not one layer profile (issue 16, item 6)
        ("features.0.0.weight", None, "features.0.0"),
        ("features.1.0.weight", None, "features.1.0"),
        ("up.weight", None, "up"),
        ("temporal.weight", None, "temporal"),
        ("classifier.weight", None, "classifier"),
    ]
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    shapes = {w.name: tuple(m.shape) for w in watched if (m := w.grad_matrix()) is not None}
    assert shapes == {
        "features.0.0.weight": (8, 3 * 3 * 3),
        "features.1.0.weight": (16, 4 * 3 * 3),  # grouped: in/groups per output
        "up.weight": (4, 16 * 2 * 2),  # transposed conv stored in x out x k x k, read out first
        "temporal.weight": (6, 4 * 5),
        "classifier.weight": (10, 6),
    }
    conv = watched[0]
    g = conv.grad_matrix()
    assert g is not None and torch.equal(g, conv.param.grad.reshape(8, -1))
    assert g.data_ptr() == conv.param.grad.data_ptr()


def test_default_module_types_cover_linear_and_convs() -> None:
    convs = {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d}
    assert set(DEFAULT_MODULE_TYPES) == {nn.Linear} | convs


def test_bare_module_and_sequential_mlp() -> None:
    lin = nn.Linear(3, 2)
    (only,) = select_parameters(lin).watched
    assert (only.name, only.module_path, only.index, only.key) == ("weight", "", None, "weight")
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert [w.key for w in select_parameters(mlp).watched] == ["0", "2"]


def test_nn_transformer_encoder_layers() -> None:
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    keys = [w.key for w in select_parameters(model).watched]
    assert keys == [f"{c}/layer_{i:02d}" for i in range(2) for c in ("self_attn.out_proj", "linear1", "linear2")]


def test_module_shared_at_two_paths_is_watched_once() -> None:
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared, nn.Linear(4, 4))})
    assert [w.name for w in select_parameters(model).watched] == ["a.weight", "b.1.weight"]


def test_sparse_embedding_gradient_is_made_dense() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    (w,) = select_parameters(emb, include_embeddings=True).watched
    emb(torch.tensor([1, 3, 3])).sum().backward()
    g = w.grad_matrix()
    assert g is not None and g.layout == torch.strided and tuple(g.shape) == (10, 4)
    assert g[3].tolist() == [2.0] * 4


def test_watched_parameter_equality_ignores_tensors() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    wa = WatchedParameter("h.1.fc.weight", "h.1.fc", 1, "fc", a.weight, a)
    wb = WatchedParameter("h.1.fc.weight", "h.1.fc", 1, "fc", b.weight, b)
    assert wa == wb and hash(wa) == hash(wb)
    assert "param" not in repr(wa) and "module" not in repr(wa).replace("module_path", "")
    assert WatchedParameter("x", "x", 123, "fc", a.weight).key == "fc/layer_123"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"include": 3}, TypeError, "`include` must be a glob string or a sequence of glob strings, got 3"),
        ({"include": ["*.weight", None]}, TypeError, "`include` must be a glob string"),
        ({"include": []}, ValueError, "`include` must hold at least one glob (use None for no filter), got []"),
        ({"exclude": b"*.weight"}, TypeError, "`exclude` must be a glob string or a sequence of glob strings, got b"),
        ({"regex": 5}, TypeError, "`regex` must be a str or a compiled re.Pattern, got 5"),
        ({"regex": "("}, ValueError, "`regex` does not compile"),
        ({"module_types": ["Linear"]}, TypeError, "`module_types` must be a sequence of nn.Module subclasses, got ["),
        ({"module_types": [int]}, TypeError, "`module_types` must be a sequence of nn.Module subclasses, got [<class"),
        ({"module_types": "Linear"}, TypeError, "`module_types` must be a sequence of nn.Module subclasses, got 'L"),
        ({"module_types": nn.Linear(2, 2)}, TypeError, "`module_types` must be a sequence of nn.Module subclasses"),
        ({"module_types": []}, ValueError, "`module_types` must hold at least one type"),
        ({"predicate": "yes"}, TypeError, "`predicate` must be a callable (name, param, module) -> bool, got 'yes'"),
        ({"include_embeddings": 1}, TypeError, "`include_embeddings` must be a bool, got 1"),
    ],
)
def test_argument_validation(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        select_parameters(nn.Linear(2, 2), **kwargs)  # type: ignore[arg-type]


def test_model_must_be_a_module() -> None:
    with pytest.raises(TypeError, match=re.escape("`model` must be an nn.Module, got {'w': 1}")):
        select_parameters({"w": 1})  # type: ignore[arg-type]


def test_single_type_and_compiled_regex_are_accepted() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Conv1d(2, 2, 1))
    assert [w.name for w in select_parameters(model, module_types=nn.Conv1d).watched] == ["1.weight"]
    assert [w.name for w in select_parameters(model, regex=re.compile(r"^0\.")).watched] == ["0.weight"]


def test_describe_empty_suggests_module_types() -> None:
    model = nn.Sequential(nn.LayerNorm(4), nn.GRU(4, 4), nn.Bilinear(4, 4, 2))
    selection = select_parameters(model)
    assert selection == Selection(watched=[], frozen=[], excluded=[], criteria="")
    message = selection.describe_empty(model)
    assert "The model has 8 parameters, e.g. '0.weight', '0.bias', '1.weight_ih_l0'," in message
    assert message.endswith("Its matrix weights sit in Bilinear: pass `module_types` to watch those.")
    (bilinear,) = select_parameters(model, module_types=[nn.Bilinear]).watched
    assert bilinear.name == "2.weight"


def test_transformers_is_not_imported() -> None:
    code = (
        "import sys, gradspectra.capture as c, torch.nn as nn; "
        "c.select_parameters(nn.Sequential(nn.Linear(2, 2))); "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_grouped_transposed_conv_matches_conv_layout() -> None:
    up = nn.ConvTranspose2d(8, 6, 3, groups=2)
    (w,) = select_parameters(up).watched
    up(torch.randn(1, 8, 4, 4)).sum().backward()
    g = w.grad_matrix()
    assert g is not None and tuple(g.shape) == (6, 4 * 3 * 3)
    # output channel 3 belongs to group 1: its row is that group's (in/groups) kernels
    assert torch.equal(g[3], up.weight.grad[4:8, 0].flatten())


def test_keys_of_a_deep_model_sort_in_layer_order() -> None:
    class Deep(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(n))

    deep = [w.key for w in select_parameters(Deep(120)).watched]
    assert deep[:2] == ["layers/layer_000", "layers/layer_001"] and deep[-1] == "layers/layer_119"
    assert sorted(deep) == deep  # layer_100 after layer_099, not after layer_10
    shallow = [w.key for w in select_parameters(Deep(12)).watched]
    assert shallow[0] == "layers/layer_00" and sorted(shallow) == shallow  # unchanged below 100 layers
