"""docs/layers.md tells the truth: its example table and API names match the code."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

import gradspectra.capture as capture
from gradspectra.capture import WatchedParameter, parse_layer_names

DOC = Path(__file__).resolve().parents[2] / "docs" / "layers.md"
ROW = re.compile(
    r"^\| (?P<model>[^|]+) \| `(?P<name>[^`]+)` \| (?P<index>\d+|-) \| `(?P<component>[^`]+)` \| `(?P<key>[^`]+)` \|$"
)


def example_rows() -> list[dict[str, str]]:
    return [m.groupdict() for line in DOC.read_text().splitlines() if (m := ROW.match(line))]


def test_example_table_matches_parse_layer_names() -> None:
    rows = example_rows()
    assert len(rows) >= 20
    by_model: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    weight = nn.Parameter(torch.zeros(1, 1))
    for model, group in by_model.items():
        parsed = parse_layer_names(row["name"] for row in group)
        for row in group:
            index = None if row["index"] == "-" else int(row["index"])
            assert parsed[row["name"]] == (index, row["component"]), (model, row["name"])
            w = WatchedParameter(row["name"], row["name"].removesuffix(".weight"), index, row["component"], weight)
            assert w.key == row["key"], (model, row["name"])


def test_documented_api_exists() -> None:
    text = DOC.read_text()
    for name in capture.__all__:
        assert f"`{name}" in text, name
    assert "grad_spectrum/<metric>/<component>/layer_<NN>" in text
