r"""The factors of a linear layer's weight gradient, kept by module hooks: :math:`G = \Delta^\top X`.

A ``nn.Linear`` weight gradient is a sum over the tokens that went through the layer,
:math:`G = \sum_t \delta_t x_t^\top = \Delta^\top X` (inputs :math:`X`, ``T x n``; output gradients
:math:`\Delta`, ``T x m``). When fewer tokens carry gradient than ``min(m, n)``, the singular values
of ``G`` come exactly from a ``T x T`` problem
(:func:`gradspectra.functional.factored_singular_values`). :class:`FactorCapture` keeps, for each
watched ``nn.Linear`` in :attr:`FactorCapture.active`, references to its inputs and output
gradients over all micro-batches of an optimizer step (no copy in the training step: measured on
MiniLM-L6, copying the rows cost 7-13 % of forward + backward). The tokens whose output gradient
is zero (padding) are dropped when the factors are asked for (on CPU). A layer stops keeping
references as soon as its tokens reach ``min(m, n)`` (known from the shapes on a GPU, after
dropping padding on CPU): the factored route cannot win there.

What is kept is only a candidate: the gradient the optimizer sees can differ from
:math:`\Delta^\top X` (DDP averages it over ranks, AMP scales :math:`\Delta`, a module called twice
in a step, activation checkpointing that runs a forward twice, gradient hooks of the user).
:meth:`FactorCapture.factors` therefore checks the factors against the gradient itself on a
random direction, :math:`\|G v - \Delta^\top (X v)\| \le 10^{-3} \|G v\|`, and gives ``None`` when
they disagree, so the caller uses the gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradspectra.capture.watched import WatchedParameter

_CHECK_RTOL = 1e-3


class FactorCapture:
    """Forward and output-gradient hooks that keep ``(Delta, X)`` rows per watched ``nn.Linear`` for one step.

    Args:
        watched: the watched parameters; those that are the ``weight`` of an ``nn.Linear`` (with a
            ``(m, n)`` weight, ``m, n >= 2``) get hooks, the others are ignored.

    Example:
        >>> lin = nn.Linear(8, 6)
        >>> w = WatchedParameter("fc.weight", "fc", None, "fc", lin.weight, lin)
        >>> capture = FactorCapture([w])
        >>> x = torch.randn(3, 8)
        >>> lin(x).sum().backward()
        >>> delta, inputs = capture.factors(0, lin.weight.grad)
        >>> tuple(delta.shape), tuple(inputs.shape)
        ((3, 6), (3, 8))
        >>> capture.close()
    """

    def __init__(self, watched: Sequence[WatchedParameter]) -> None:
        self._handles: list[RemovableHandle] = []
        #: layers whose factors are kept this step (``None``: every hooked layer)
        self.active: set[int] | None = None
        self._rows: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._tokens: dict[int, int] = {}
        self._full: set[int] = set()
        self._limit: dict[int, int] = {}
        for i, w in enumerate(watched):
            module = w.module
            if w.implied or not isinstance(module, nn.Linear) or w.param is not module.weight:
                continue
            m, n = module.weight.shape
            if min(m, n) < 2:
                continue
            self._limit[i] = min(m, n)
            self._handles.append(module.register_forward_hook(self._forward_hook(i)))

    @property
    def layers(self) -> list[int]:
        """Indices (into ``watched``) of the layers with hooks."""
        return sorted(self._limit)

    def _forward_hook(self, i: int) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if i in self._full or not isinstance(output, Tensor) or not output.requires_grad or not inputs:
                return
            if self.active is not None and i not in self.active:
                return
            x = inputs[0]
            if not isinstance(x, Tensor) or not isinstance(module, nn.Linear) or x.shape[-1] != module.in_features:
                return
            x = x.detach()
            output.register_hook(lambda grad: self._keep(i, x, grad))  # type: ignore[no-untyped-call]

        return hook

    def _keep(self, i: int, x: Tensor, grad: Tensor) -> None:
        if i in self._full:
            return
        d = grad.detach().reshape(-1, grad.shape[-1])
        xs = x.reshape(-1, x.shape[-1])
        if d.shape[0] != xs.shape[0]:
            self._drop(i)
            return
        tokens = self._tokens.get(i, 0) + int(d.shape[0])
        if tokens >= self._limit[i] and d.device.type != "cpu":
            # on a GPU every row is kept (finding the padding ones would wait for the device)
            self._drop(i)
            return
        self._tokens[i] = tokens
        # references only: autograd keeps x for the weight gradient anyway; nothing is copied here
        self._rows.setdefault(i, []).append((d, xs))

    def _drop(self, i: int) -> None:
        self._full.add(i)
        self._rows.pop(i, None)
        self._tokens.pop(i, None)

    def tokens(self, i: int) -> int | None:
        """Rows kept for layer ``i`` this step (padding included on CPU), ``None`` when it has none usable."""
        if i in self._full or i not in self._rows:
            return None
        return self._tokens[i]

    def factors(self, i: int, grad: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor] | None:
        """``(Delta, X)`` of layer ``i`` (``T x m``, ``T x n``) if they reproduce ``grad`` (``m x n``), else None."""
        if self.tokens(i) is None:
            return None
        parts = self._rows[i]
        delta = torch.cat([d for d, _ in parts]) if len(parts) > 1 else parts[0][0]
        x = torch.cat([xs for _, xs in parts]) if len(parts) > 1 else parts[0][1]
        if delta.shape[1] != grad.shape[0] or x.shape[1] != grad.shape[1]:
            return None
        if delta.device.type == "cpu":
            # padding tokens carry no gradient: their rows change nothing but T
            carries = delta.abs().amax(dim=1) > 0
            delta, x = delta[carries], x[carries]
        if delta.shape[0] >= self._limit[i]:
            return None
        v = torch.randn(grad.shape[1], 1, generator=generator, dtype=torch.float64).to(grad.device)
        want = grad.to(torch.float64) @ v
        got = delta.to(torch.float64).mT @ (x.to(torch.float64) @ v)
        scale = float(torch.linalg.vector_norm(want))
        if not scale > 0 or float(torch.linalg.vector_norm(got - want)) > _CHECK_RTOL * scale:
            return None
        return delta, x

    def clear(self) -> None:
        """Forget this step's rows (call after each optimizer step)."""
        self._rows.clear()
        self._tokens.clear()
        self._full.clear()

    def close(self) -> None:
        """Remove the hooks and forget everything."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()
