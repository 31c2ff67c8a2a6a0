"""TensorBoard views of layer-wise spectra: custom-scalar layouts, layer-profile figures and layer x step heatmaps.

Figures are built with matplotlib's Agg backend (imported lazily) and handed to a TensorBoard
``SummaryWriter``; nothing here touches Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TAG_ROOT = "grad_spectrum"


def layer_tag(metric: str, key: str) -> str:
    """``grad_spectrum/<metric>/<component>/layer_<NN>`` for a layer key ``<component>/layer_<NN>``."""
    return f"{TAG_ROOT}/{metric}/{key}"


def custom_scalars_layout(metrics: Sequence[str], components: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """One TensorBoard custom-scalars category per metric, one multiline chart per component.

    Each chart gathers every layer of the component (``.../<component>/layer_\\d+``), so the layers
    of one projection can be compared in one plot.
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    for metric in metrics:
        charts: dict[str, list[Any]] = {}
        for component in components:
            charts[component] = ["Multiline", [rf"^{TAG_ROOT}/{metric}/{_re_escape(component)}(/layer_\d+)?$"]]
        charts["all layers: mean, min, max"] = ["Multiline", [rf"^{TAG_ROOT}_layers/{metric}/(mean|min|max)$"]]
        layout[f"gradspectra: {metric}"] = charts
    layout["gradspectra: batches"] = {
        "score and threshold": ["Multiline", [r"^gradspectra/(score|threshold)$"]],
        "flagged": ["Multiline", [r"^gradspectra/(flagged|flagged_total)$"]],
    }
    return layout


def _re_escape(text: str) -> str:
    return "".join("\\" + c if c in ".^$*+?{}[]\\|()" else c for c in text)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def layer_profile_figure(
    metric: str, curves: Mapping[str, Sequence[tuple[int, float]]], step: int | None = None
) -> Figure:
    """The papers' figure: ``metric`` against layer index, one curve per component."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=100)
    for component, points in sorted(curves.items()):
        if not points:
            continue
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=component)
    ax.set_xlabel("layer index")
    ax.set_ylabel(metric)
    title = f"{metric} by layer"
    ax.set_title(title if step is None else f"{title} (step {step})")
    if curves:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig  # type: ignore[no-any-return]


def heatmap_figure(metric: str, layer_keys: Sequence[str], steps: Sequence[int], values: np.ndarray) -> Figure:
    """A layer x step heatmap of ``metric`` (``values`` shaped ``(len(layer_keys), len(steps))``).

    Colour is log10 of the value for positive metrics, so layers of different scale stay readable;
    non-finite cells are left blank.
    """
    plt = _pyplot()
    data = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(data)
    positive = bool(finite.any()) and bool((data[finite] > 0).all())
    shown = np.where(finite & (data > 0), np.log10(np.where(data > 0, data, 1.0)), np.nan) if positive else data
    height = max(3.0, min(12.0, 0.18 * len(layer_keys) + 1.5))
    fig, ax = plt.subplots(figsize=(8.0, height), dpi=100)
    extent = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5, len(layer_keys) - 0.5, -0.5) if steps else None
    image = ax.imshow(
        np.ma.masked_invalid(shown), aspect="auto", interpolation="nearest", cmap="viridis", extent=extent
    )
    ax.set_yticks(range(len(layer_keys)))
    ax.set_yticklabels(layer_keys, fontsize=6)
    ax.set_xlabel("step")
    ax.set_title(f"{metric} per layer and step")
    fig.colorbar(image, ax=ax, label=f"log10 {metric}" if positive else metric)
    fig.tight_layout()
    return fig  # type: ignore[no-any-return]


def flagged_table(records: Sequence[Mapping[str, Any]], top: int = 10) -> str:
    """A plain-text table of the ``top`` highest-scoring records (flagged or not), highest first."""
    scored = [r for r in records if isinstance(r.get("score"), (int, float)) and np.isfinite(r["score"])]
    scored.sort(key=lambda r: -float(r["score"]))
    rows = scored[:top]
    header = f"{'step':>6} {'epoch':>5} {'batch':>6} {'score':>8} {'flag':>4}  reasons"
    lines = [header, "-" * len(header)]
    for r in rows:
        reasons = "; ".join(r.get("reasons") or []) or "-"
        ids = r.get("sample_ids")
        if ids:
            shown = ", ".join(str(i) for i in list(ids)[:6]) + (" ..." if len(ids) > 6 else "")
            reasons += f"  [samples: {shown}]"
        lines.append(
            f"{r.get('step', ''):>6} {r.get('epoch', ''):>5} {r.get('batch_idx', ''):>6} "
            f"{float(r['score']):>8.2f} {'yes' if r.get('flagged') else 'no':>4}  {reasons}"
        )
    if not rows:
        lines.append("(no scored steps yet: still in warm-up)")
    return "\n".join(lines)
