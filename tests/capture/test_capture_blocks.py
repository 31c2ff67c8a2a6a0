"""Only repeated blocks are layers of one component (issue 16, item 6): a Sequential's layers are not depth."""

from __future__ import annotations

import re

import pytest
from torch import nn

from gradspectra.capture import group_by_component, parse_layer_names, select_parameters


def keys(model: nn.Module) -> list[str]:
    return [w.key for w in select_parameters(model).watched]


def profiles(model: nn.Module) -> dict[str, list[int | None]]:
    """Components with two or more indexed layers: what a layer profile is drawn over."""
    groups = group_by_component(select_parameters(model).watched)
    return {c: [w.index for w in g] for c, g in groups.items() if len(g) >= 2 and g[0].index is not None}


class FeaturesHead(nn.Module):
    """The model of the report: conv features, then a flatten + two-Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, 10))


def test_features_head_cnn_layers_keep_their_own_names() -> None:
    model = FeaturesHead()
    watched = select_parameters(model).watched
    assert [(w.name, w.index, w.component, w.key) for w in watched] == [
        ("features.0.weight", None, "features.0", "features.0"),
        ("features.3.weight", None, "features.3", "features.3"),
        ("head.1.weight", None, "head.1", "head.1"),
        ("head.3.weight", None, "head.3", "head.3"),
    ]
    assert profiles(model) == {}, "64 x 1024 and 10 x 64 must not enter one layer profile"


def test_sequential_of_identical_linears_stays_indexed() -> None:
    model = nn.ModuleDict(
        {"body": nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))}
    )
    assert keys(model) == ["body/layer_00", "body/layer_02", "body/layer_04"]
    assert profiles(model) == {"body": [0, 2, 4]}


def test_mlp_with_in_and_out_projections() -> None:
    mlp = nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)
    )
    # the two 16 x 16 layers repeat; the projections in and out are their own components
    assert keys(nn.ModuleDict({"mlp": mlp})) == ["mlp.0", "mlp/layer_02", "mlp/layer_04", "mlp.6"]


class Block(nn.Module):
    def __init__(self, d: int, out: int | None = None) -> None:
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, out or d)


class Final(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.proj = nn.Linear(d, 3)


class Stack(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


def test_module_list_of_identical_blocks_plus_a_different_final_block() -> None:
    model = Stack([Block(8), Block(8), Block(8), Final(8)])
    assert keys(model) == [
        *(f"{c}/layer_{i:02d}" for i in range(3) for c in ("attn", "fc1", "fc2")),
        "blocks.3.attn",  # another class: not one of the repeated blocks, even with the same shape
        "blocks.3.proj",
    ]
    assert profiles(model) == {"attn": [0, 1, 2], "fc1": [0, 1, 2], "fc2": [0, 1, 2]}


def test_last_block_of_the_same_class_with_another_output_width() -> None:
    # the rule is per weight: fc1 and attn of the last block repeat the others', fc2 (32 -> 2) does not
    model = Stack([Block(8), Block(8), Block(8, out=2)])
    assert keys(model) == [
        *(f"{c}/layer_{i:02d}" for i in range(2) for c in ("attn", "fc1", "fc2")),
        "attn/layer_02",
        "fc1/layer_02",
        "blocks.2.fc2",
    ]


def test_one_layer_block_list_keeps_its_index_a_lone_sequential_child_does_not() -> None:
    assert keys(Stack([Block(8)])) == ["attn/layer_00", "fc1/layer_00", "fc2/layer_00"]
    model = nn.ModuleDict({"head": nn.Sequential(nn.Flatten(), nn.Linear(8, 2))})
    assert keys(model) == ["head.1"]


class Stage(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(d, d, 3), nn.ReLU(), nn.Conv2d(d, d, 3))


def test_a_later_index_is_used_when_the_first_does_not_number_repeated_blocks() -> None:
    # stages of different widths are not repeated; the convolutions inside each stage are
    model = nn.ModuleDict({"stages": nn.ModuleList([Stage(8), Stage(16)])})
    watched = select_parameters(model).watched
    assert [(w.index, w.key) for w in watched] == [
        (0, "0.convs/layer_00"),
        (2, "0.convs/layer_02"),
        (0, "1.convs/layer_00"),
        (2, "1.convs/layer_02"),
    ]


class Wrapped(nn.Module):
    """Stands for torch.compile's OptimizedModule / a checkpoint wrapper: the inner module under a wrapper name."""

    def __init__(self, inner: nn.Module, attr: str) -> None:
        super().__init__()
        self.add_module(attr, inner)


def test_wrappers_do_not_change_the_verdict() -> None:
    assert keys(Wrapped(FeaturesHead(), "_orig_mod")) == ["features.0", "features.3", "head.1", "head.3"]
    blocks = [Wrapped(Block(8), "_checkpoint_wrapped_module") for _ in range(2)]
    assert keys(Wrapped(Stack(blocks), "_orig_mod")) == [
        f"{c}/layer_{i:02d}" for i in range(2) for c in ("attn", "fc1", "fc2")
    ]


def test_frozen_or_filtered_siblings_still_count() -> None:
    """The verdict is about the model's structure, not about which weights are watched."""
    model = Stack([Block(8), Block(8), Block(8)])
    for p in model.blocks[1].parameters():
        p.requires_grad_(False)
    only_first = select_parameters(model, include="blocks.0.*")
    assert [w.key for w in only_first.watched] == ["attn/layer_00", "fc1/layer_00", "fc2/layer_00"]


def test_parse_layer_names_with_and_without_the_model() -> None:
    model = FeaturesHead()
    names = ["features.0.weight", "features.0.bias", "head.3.weight", "elsewhere.3.fc.weight"]
    assert parse_layer_names(names, model) == {
        "features.0.weight": (None, "features.0"),
        "features.0.bias": (None, "features.0"),
        "head.3.weight": (None, "head.3"),
        "elsewhere.3.fc.weight": (3, "fc"),  # not a path of the model: parsed from the name alone
    }
    assert parse_layer_names(names)["head.3.weight"] == (3, "head")


def test_parse_layer_names_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match=re.escape("`model` must be an nn.Module or None, got 'model'")):
        parse_layer_names(["a.0.weight"], "model")  # type: ignore[arg-type]
