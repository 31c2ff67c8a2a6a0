"""One watched weight: where it sits in the model, its display key, and how its gradient is read."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from gradspectra.functional.reshape import as_matrix


@dataclass(frozen=True)
class WatchedParameter:
    """A parameter whose gradient spectrum is measured.

    Attributes:
        name: full parameter name, ``"model.layers.12.self_attn.q_proj.weight"``. For a tied weight it
            is the path through the module it is watched as (``"lm_head.weight"`` in GPT-2), which
            may differ from the one alias ``named_parameters()`` reports.
        module_path: the owning module's path, ``"model.layers.12.self_attn.q_proj"``.
        index: the layer index, ``12``; ``None`` when the name has none.
        component: what the weight is inside its layer, ``"self_attn.q_proj"``; without an index,
            the module path (or the parameter name for a parameter not held by a module).
        param: the parameter itself (not compared, not in ``repr``).
        module: the module that owns it, used to read the gradient in the right orientation.
        index_width: digits of the layer index in :attr:`key`, zero-padded (2; 3 in a model with 100
            or more layers, so that the keys sort in layer order).
        implied: the weight is frozen and what is measured is its implied full-weight gradient
            ``D^T X`` (the ``nn.Linear``'s output gradients and inputs, kept by
            :class:`gradspectra.capture.ImpliedGradients`), not ``param.grad``.
        adapter: the adapter(s) wrapping the layer (peft's adapter names, ``"default"``), ``None`` when
            no adapter does.

    Example:
        >>> lin = nn.Linear(4, 3)
        >>> w = WatchedParameter("layers.2.fc.weight", "layers.2.fc", 2, "fc", lin.weight, lin)
        >>> w.key
        'fc/layer_02'
        >>> w.grad_matrix() is None
        True
        >>> lin(torch.ones(5, 4)).sum().backward()
        >>> tuple(w.grad_matrix().shape)
        (3, 4)
    """

    name: str
    module_path: str
    index: int | None
    component: str
    param: nn.Parameter = field(compare=False, repr=False)
    module: nn.Module | None = field(default=None, compare=False, repr=False)
    index_width: int = field(default=2, compare=False, repr=False)
    implied: bool = field(default=False, compare=False)
    adapter: str | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        """The display and tag key: ``"self_attn.q_proj/layer_12"``, or the component when there is no index.

        TensorBoard tags are ``grad_spectrum/<metric>/<key>``.
        """
        if self.index is None:
            return self.component
        return f"{self.component}/layer_{self.index:0{self.index_width}d}"

    def grad_matrix(self) -> torch.Tensor | None:
        """The current gradient as an ``out x in`` matrix, or ``None`` when there is no gradient.

        ``param.grad`` reshaped by :func:`gradspectra.functional.as_matrix` for the owning module
        (conv kernels flattened, GPT-2 ``Conv1D`` transposed), on the gradient's device and in its
        dtype. It is the gradient or a view of it, with no copy, except for a transposed convolution
        (regrouped, a copy) and a sparse gradient (``nn.Embedding(sparse=True)``, made dense).
        ``None`` as well for a parameter with no matrix form (1-D or 0-D).
        """
        grad = self.param.grad
        if grad is None:
            return None
        if grad.layout != torch.strided:
            grad = grad.to_dense()
        # the weight was chosen on purpose, so an embedding here is one the user asked for
        return as_matrix(grad, self.module, include_embeddings=True)


def group_by_component(watched: Iterable[WatchedParameter]) -> dict[str, list[WatchedParameter]]:
    """Watched parameters grouped by component, each group sorted by layer index: one curve per component.

    Groups come in the order their component first appears; inside a group, parameters without an
    index come after the indexed ones (a component is normally all-indexed or a single unindexed weight).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> ws = [WatchedParameter(f"h.{i}.{c}.weight", f"h.{i}.{c}", i, c, lin.weight, lin)
        ...       for i in (1, 0) for c in ("q", "k")]
        >>> {c: [w.index for w in g] for c, g in group_by_component(ws).items()}
        {'q': [0, 1], 'k': [0, 1]}
    """
    groups: dict[str, list[WatchedParameter]] = {}
    for w in watched:
        if not isinstance(w, WatchedParameter):
            raise TypeError(f"`watched` must hold WatchedParameter, got {w!r}")
        groups.setdefault(w.component, []).append(w)
    for group in groups.values():
        group.sort(key=lambda w: (w.index is None, w.index if w.index is not None else 0))
    return groups
