r"""The implied full-weight gradient of a frozen linear layer, :math:`G = \Delta^\top X`, from module hooks.

In a LoRA (or DoRA, IA3, partly frozen) fine-tune the base weights are frozen: autograd never forms
their gradient, yet it is what the papers measure, and it does not depend on the adapter's rank or
initialisation. For an ``nn.Linear`` it is a sum over the tokens that went through the layer,
:math:`G = \sum_t \delta_t x_t^\top = \Delta^\top X` (inputs :math:`X`, ``T x n``; output gradients
:math:`\Delta`, ``T x m``). :class:`ImpliedGradients` keeps references to both for each watched frozen
layer (references, no copy; they keep the inputs alive until the step ends, which autograd itself would
not do for a frozen layer) and forms
:math:`G` when asked (:meth:`ImpliedGradients.matrix`); :meth:`ImpliedGradients.factors` gives the rows
themselves, padding dropped, for the ``T x T`` route.

Gradient accumulation: once a layer's kept tokens reach ``min(m, n)`` (where the ``T x T`` route cannot
win), each further micro-batch folds the rows kept so far into one ``m x n`` sum in float32 (float64 for
float64 layers), so the memory held is at most one micro-batch's rows plus one matrix, whatever the
number of micro-batches. When all of a step's rows are still kept and fewer than ``min(m, n)`` of them
carry gradient, the exact spectrum comes from them through the ``T x T`` route
(:meth:`ImpliedGradients.factors`).

A frozen layer whose output needs no gradient (the first layers of a model with frozen embeddings,
an adapter-free layer upstream of every trainable one) would get no :math:`\Delta` from autograd; its
output is then replaced by a copy that requires one (a copy, not a leaf, so that in-place operations after
the layer stay legal), and the backward also runs through that part of the graph: the implied gradient
has a price there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradspectra.capture.watched import WatchedParameter
from gradspectra.functional.reshape import is_conv1d


def _in_features(module: nn.Module | None) -> int | None:
    """The input width of a linear layer (``nn.Linear``, or GPT-2's ``Conv1D``, weight stored ``in x out``), else None.

    For both the implied gradient in the ``out x in`` orientation of :func:`gradspectra.functional.as_matrix` is
    ``D^T X``."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if module is not None and is_conv1d(module):
        weight = getattr(module, "weight", None)
        return int(weight.shape[0]) if isinstance(weight, Tensor) and weight.ndim == 2 else None
    return None


def _carries(d: Tensor, x: Tensor) -> Tensor:
    """Rows that add to ``D^T X``: a nonzero output gradient, or a non-finite input (``0 x inf`` is NaN, as in
    autograd's product: a bad value must show, never be dropped with the padding)."""
    return (d != 0).any(dim=1) | ~x.isfinite().all(dim=1)


def is_linear(module: nn.Module | None) -> bool:
    """Whether ``module``'s frozen weight can be measured by its implied gradient (``nn.Linear``, GPT-2 ``Conv1D``)."""
    return _in_features(module) is not None


class ImpliedGradients:
    """Hooks that keep ``(Delta, X)`` of each watched frozen ``nn.Linear`` for one optimizer step.

    Args:
        watched: the watched parameters; those with ``implied=True`` whose module is an ``nn.Linear`` (or a
            GPT-2 ``Conv1D``) get hooks, the others are ignored.

    Read :meth:`matrix` (or :meth:`factors`) after the backward, call :meth:`clear` after the
    optimizer step (the references are released there).

    Example:
        >>> lin = nn.Linear(8, 6).requires_grad_(False)
        >>> w = WatchedParameter("fc.weight", "fc", None, "fc", lin.weight, lin, implied=True)
        >>> implied = ImpliedGradients([w])
        >>> x = torch.randn(3, 8)
        >>> lin(x).sum().backward()
        >>> g = implied.matrix(0)
        >>> bool(torch.allclose(g, torch.ones(3, 6).mT @ x))
        True
        >>> implied.close()
    """

    def __init__(self, watched: Sequence[WatchedParameter]) -> None:
        self._handles: list[RemovableHandle] = []
        #: whether the hooks keep anything (a step that is not measured keeps nothing)
        self.enabled = True
        #: the layers whose rows are kept this step (``None``: every hooked layer); the others keep nothing
        self.active: set[int] | None = None
        self._rows: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._tokens: dict[int, int] = {}
        self._sum: dict[int, Tensor] = {}
        self._formed: set[int] = set()  # layers whose matrix holds every kept row
        self._partial: set[int] = set()  # layers some of whose rows were folded away (no T x T factors)
        self._limit: dict[int, int] = {}
        self._generation = 0  # bumped by clear(): gradients of graphs built before it are ignored
        #: layers whose rows did not fit their weight this step (the layer was called on something else)
        self.broken: set[int] = set()
        for i, w in enumerate(watched):
            module = w.module
            if not w.implied or module is None or not is_linear(module):
                continue
            if w.param is not getattr(module, "weight", None):
                continue
            self._limit[i] = min(w.param.shape)
            self._handles.append(module.register_forward_hook(self._forward_hook(i)))

    @property
    def layers(self) -> list[int]:
        """Indices (into ``watched``) of the layers with hooks."""
        return sorted(self._limit)

    def _forward_hook(self, i: int) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            if not self.enabled or not torch.is_grad_enabled() or not isinstance(output, Tensor) or not inputs:
                return None
            if self.active is not None and i not in self.active:
                return None
            x = inputs[0]
            if not isinstance(x, Tensor) or x.shape[-1] != _in_features(module):
                return None
            generation, version = self._generation, x._version
            replaced = None
            if not output.requires_grad:
                # nothing upstream is trained: ask autograd for this output's gradient all the same. The
                # output is copied (a leaf that requires grad would forbid in-place operations after the layer)
                replaced = output.detach().requires_grad_(True).clone()
                output = replaced
            x = x.detach()
            output.register_hook(lambda grad: self._keep(i, generation, x, grad, version))  # type: ignore[no-untyped-call]
            return replaced

        return hook

    def _keep(self, i: int, generation: int, x: Tensor, grad: Tensor, version: int | None = None) -> None:
        if generation != self._generation or i in self.broken:
            return
        d = grad.detach().reshape(-1, grad.shape[-1])
        xs = x.reshape(-1, x.shape[-1])
        # rows that do not fit, or an input changed in place after the layer read it (autograd did not save
        # it for a frozen layer, so nothing else would notice): the layer has no implied gradient this step
        if d.shape[0] != xs.shape[0] or (version is not None and x._version != version):
            self._break(i)
            return
        tokens = self._tokens.get(i, 0)
        if i in self._formed:
            # the matrix was formed before this backward: its rows are in the sum already
            self._rows.pop(i, None)
            self._formed.discard(i)
            self._partial.add(i)
        elif self._rows.get(i) and tokens + int(d.shape[0]) >= self._limit[i]:
            try:
                self._fold(i)
            except RuntimeError:  # out of memory inside the user's backward: lose this layer's step, not the run
                self._break(i)
                return
            self._partial.add(i)
        self._tokens[i] = tokens + int(d.shape[0])
        # references only: nothing is copied in the training step
        self._rows.setdefault(i, []).append((d, xs))

    def _break(self, i: int) -> None:
        self.broken.add(i)
        self._rows.pop(i, None)
        self._sum.pop(i, None)

    def _fold(self, i: int) -> None:
        """Sum the rows kept so far into the layer's ``m x n`` matrix and let them go."""
        self._add(i, self._rows.pop(i, []))

    def _add(self, i: int, rows: list[tuple[Tensor, Tensor]]) -> None:
        for d, xs in rows:
            if d.device.type == "cpu":
                # padding rows carry no gradient: leaving them out of the product costs one read of D
                # (on a GPU finding them would wait for the device, and the product is cheap there)
                carries = _carries(d, xs)
                if not bool(carries.all()):
                    d, xs = d[carries], xs[carries]
            dtype = torch.float64 if d.dtype == torch.float64 or xs.dtype == torch.float64 else torch.float32
            part = d.to(dtype).mT @ xs.to(dtype)
            self._sum[i] = part if i not in self._sum else self._sum[i].add_(part.to(self._sum[i].dtype))

    def has(self, i: int) -> bool:
        """Whether layer ``i`` got a gradient this step."""
        return i not in self.broken and (bool(self._rows.get(i)) or i in self._sum)

    def tokens(self, i: int) -> int:
        """Token rows that reached layer ``i`` this step (padding included)."""
        return self._tokens.get(i, 0)

    def matrix(self, i: int) -> Tensor | None:
        """Layer ``i``'s implied gradient ``Delta^T X`` (``m x n``, float32; float64 for a float64 layer), or None.

        Formed once per step (``2 T m n`` flops); the rows stay kept for :meth:`factors` until :meth:`clear`.
        """
        if not self.has(i):
            return None
        if i not in self._formed:
            self._add(i, self._rows.get(i, []))
            self._formed.add(i)
        return self._sum[i]

    def factors(self, i: int, grad: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """``(Delta, X)`` of layer ``i`` with the padding rows (zero output gradient) dropped, or ``None``.

        ``None`` as well when some of the step's rows were folded into the matrix (under accumulation, past
        ``min(m, n)`` tokens), or when ``min(m, n)`` tokens or more carry gradient (the ``T x T`` route cannot
        win there). ``grad`` is accepted for the signature of :meth:`gradspectra.capture.FactorCapture.factors`
        and not needed: the factors are the gradient's by construction.
        """
        if i in self.broken or i in self._partial or not self._rows.get(i):
            return None
        parts = self._rows[i]
        delta = torch.cat([d for d, _ in parts]) if len(parts) > 1 else parts[0][0]
        x = torch.cat([xs for _, xs in parts]) if len(parts) > 1 else parts[0][1]
        carries = _carries(delta, x)
        delta, x = delta[carries], x[carries]
        if delta.shape[0] >= self._limit[i]:
            return None
        return delta, x

    def kept_bytes(self) -> int:
        """Bytes held by the references and the sums (counting each distinct storage once)."""
        seen: dict[int, int] = {}
        for rows in self._rows.values():
            for d, xs in rows:
                for t in (d, xs):
                    storage = t.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
        for s in self._sum.values():
            seen[s.untyped_storage().data_ptr()] = s.untyped_storage().nbytes()
        return sum(seen.values())

    def clear(self) -> None:
        """Forget this step's rows and sums (call after each optimizer step)."""
        self._rows.clear()
        self._tokens.clear()
        self._sum.clear()
        self._formed.clear()
        self._partial.clear()
        self.broken.clear()
        self._generation += 1

    def close(self) -> None:
        """Remove the hooks and forget everything."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()
