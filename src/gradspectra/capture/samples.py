r"""Module hooks that keep each watched linear layer's factors with their sample dimension, for per-sample spectra.

Sample :math:`i`'s share of a linear layer's weight gradient is :math:`G_i = \Delta_i^\top X_i`, from the
rows of the layer's inputs and output gradients that belong to it (dimension 0 of the input is the
sample). :class:`SampleCapture` keeps references to both (no copy: autograd keeps the inputs for the
weight gradient anyway) for the micro-batches of one optimizer step; they are released by :meth:`clear`
at the optimizer step. Micro-batches hold different samples; two calls of one layer in the same
micro-batch (a shared weight) are the same samples, and their tokens are joined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradspectra.capture.watched import WatchedParameter

_CHECK_RTOL = 1e-3
# bf16/fp16 factors (or a layer under autocast, whose kept input is the float32 one autograd cast): the sum
# of the factors and the gradient differ by 1.6-1.9e-3 under bf16 (measured), 2e-4 under fp16
_LOW_RTOL = 1e-2
_LOW = (torch.bfloat16, torch.float16)


class SampleCapture:
    """Forward and output-gradient hooks that keep ``(Delta, X)`` per sample for each watched ``nn.Linear``.

    Args:
        watched: the watched parameters; those that are the ``weight`` of an ``nn.Linear`` (both sides
            at least 2) get hooks, the others are ignored.

    Read :meth:`factors` after the backward, call :meth:`clear` after the optimizer step.

    Example:
        >>> lin = nn.Linear(8, 6)
        >>> w = WatchedParameter("fc.weight", "fc", None, "fc", lin.weight, lin)
        >>> capture = SampleCapture([w])
        >>> lin(torch.randn(4, 3, 8)).sum().backward()
        >>> [tuple(t.shape) for t in capture.factors(0)[0]]
        [(4, 3, 6), (4, 3, 8)]
        >>> capture.close()
    """

    def __init__(self, watched: Sequence[WatchedParameter]) -> None:
        self._handles: list[RemovableHandle] = []
        #: whether the hooks keep anything (a step that is not measured keeps nothing)
        self.enabled = True
        self._batch = 0
        # layer -> micro-batch -> calls of (delta, inputs), each (B, T, .)
        self._rows: dict[int, dict[int, list[tuple[Tensor, Tensor]]]] = {}
        self._pending: dict[int, int] = {}
        self._got: set[int] = set()  # layers whose output gradient arrived in the current micro-batch
        self._first: int | None = None  # the layer whose output gradient arrived first this step
        self._generation = 0  # bumped by clear(): gradients of graphs built before it are ignored
        self._layers: list[int] = []
        for i, w in enumerate(watched):
            module = w.module
            if not isinstance(module, nn.Linear) or w.param is not module.weight:
                continue
            if min(module.weight.shape) < 2:
                continue
            self._layers.append(i)
            self._handles.append(module.register_forward_hook(self._forward_hook(i)))

    @property
    def layers(self) -> list[int]:
        """Indices (into ``watched``) of the layers with hooks."""
        return list(self._layers)

    @property
    def output_layer(self) -> int | None:
        """The hooked layer closest to the loss this step (its output gradient arrived first in the backward,
        whatever the modules' order), or ``None`` before any arrived."""
        return self._first

    def delivered(self, i: int) -> bool:
        """Whether every forward of layer ``i`` this step got its output gradient (none is still waiting)."""
        return not self._pending.get(i, 0)

    def next_batch(self) -> None:
        """Start a new micro-batch: the samples of the next forward are new samples.

        Seldom needed: a forward of a layer whose gradient already arrived starts one by itself (the next
        micro-batch of gradient accumulation), while a layer called twice in one forward does not.
        """
        if any(self._rows.get(i, {}).get(self._batch) for i in self._layers):
            self._batch += 1
        self._got.clear()

    def _forward_hook(self, i: int) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not self.enabled or not isinstance(output, Tensor) or not output.requires_grad or not inputs:
                return
            x = inputs[0]
            if not isinstance(x, Tensor) or not isinstance(module, nn.Linear) or x.ndim < 2:
                return
            if x.shape[-1] != module.in_features:
                return
            if i in self._got:
                self.next_batch()
            batch, generation = self._batch, self._generation
            x = x.detach()
            self._pending[i] = self._pending.get(i, 0) + 1
            output.register_hook(  # type: ignore[no-untyped-call]
                lambda grad: self._keep(i, batch, generation, x, grad)
            )

        return hook

    def _keep(self, i: int, batch: int, generation: int, x: Tensor, grad: Tensor) -> None:
        if generation != self._generation:
            # a graph built before the last clear() (another optimizer's loss, say): not this step's samples
            return
        self._pending[i] = self._pending.get(i, 1) - 1
        self._got.add(i)
        d = grad.detach()
        if d.shape[:-1] != x.shape[:-1]:
            return
        b = x.shape[0]
        d3 = d.reshape(b, -1, d.shape[-1]) if d.ndim > 2 else d[:, None, :]
        x3 = x.reshape(b, -1, x.shape[-1]) if x.ndim > 2 else x[:, None, :]
        if self._first is None:
            self._first = i
        self._rows.setdefault(i, {}).setdefault(batch, []).append((d3, x3))

    def factors(self, i: int) -> list[tuple[Tensor, Tensor]]:
        """Layer ``i``'s ``(Delta, X)`` per micro-batch, each ``(B_k, T_k, m)`` and ``(B_k, T_k, n)``.

        Two calls of the layer within one micro-batch with the same number of samples are joined along
        the tokens (their gradients add up per sample); calls with another number of samples cannot be
        attributed and make the micro-batch unusable (left out). Empty when nothing was kept.
        """
        out: list[tuple[Tensor, Tensor]] = []
        for batch in sorted(self._rows.get(i, {})):
            calls = self._rows[i][batch]
            if len({d.shape[0] for d, _ in calls}) != 1:
                continue
            if len(calls) == 1:
                out.append(calls[0])
            else:
                out.append((torch.cat([d for d, _ in calls], dim=1), torch.cat([x for _, x in calls], dim=1)))
        return out

    def check(self, i: int, grad: Tensor, generator: torch.Generator | None = None) -> float | None:
        r"""The scale ``c`` with ``grad = c * sum_i Delta_i^T X_i`` on a random direction, or ``None``.

        The gradient the optimizer sees can be a multiple of the kept factors' sum: gradient clipping (one
        factor for every layer), an AMP loss scale the front door does not know; the caller compares the
        layers' scales. It can also be something else (DDP averages over ranks, activation checkpointing runs
        a forward twice, a gradient hook of the user): then the residual after the best scale is over the
        tolerance (1e-3 of the gradient, 1e-2 when the factors are bf16/fp16 or the layer ran under
        autocast) and the answer is ``None``. ``nan`` when the gradient itself is not finite (nothing to
        compare: a non-finite sample, which the scores report).
        """
        parts = self.factors(i)
        if not parts or self._pending.get(i, 0):
            return None
        # float32 is enough for the check, and reads every factor once
        v = torch.randn(grad.shape[1], 1, generator=generator).to(grad.device)
        want = grad.float() @ v
        got = torch.zeros_like(want)
        low = grad.dtype in _LOW
        for d, x in parts:
            if d.shape[-1] != grad.shape[0] or x.shape[-1] != grad.shape[1]:
                return None
            low = low or d.dtype in _LOW or x.dtype in _LOW
            got = got + d.reshape(-1, d.shape[-1]).float().mT @ (x.reshape(-1, x.shape[-1]).float() @ v)
        if not bool(torch.isfinite(want).all() & torch.isfinite(got).all()):
            return math.nan
        norm = float(torch.linalg.vector_norm(got))
        if not norm > 0:
            return None
        tol = (_LOW_RTOL if low else _CHECK_RTOL) * float(torch.linalg.vector_norm(want))
        if float(torch.linalg.vector_norm(want - got)) <= tol:
            return 1.0  # the plain case, exactly: no rescaling of the factors
        c = float((got * want).sum()) / norm**2
        return c if c > 0 and float(torch.linalg.vector_norm(want - c * got)) <= tol else None

    def kept_bytes(self) -> int:
        """Bytes of the tensors referenced now (inputs counted once per call; output gradients are held only
        here, inputs also by autograd until the backward has used them)."""
        seen: set[int] = set()
        total = 0
        for batches in self._rows.values():
            for calls in batches.values():
                for d, x in calls:
                    for t in (d, x):
                        key = t.untyped_storage().data_ptr()
                        if key not in seen:
                            seen.add(key)
                            total += t.untyped_storage().nbytes()
        return total

    def clear(self) -> None:
        """Release this step's references (call after each optimizer step)."""
        self._rows.clear()
        self._pending.clear()
        self._got.clear()
        self._first = None
        self._batch = 0
        self._generation += 1

    def close(self) -> None:
        """Remove the hooks and forget everything."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()
