"""Full gradient matrices of watched weights under FSDP (one FSDP unit at a time) and of DTensor gradients.

Under ``FullyShardedDataParallel`` every rank holds a flat slice of each gradient; a slice has no
spectrum. :func:`sharded_gradients` unshards one unit (its parameters and gradients) at a time with
the public ``FullyShardedDataParallel.summon_full_params(..., with_grads=True)``, so the caller can
measure that unit's full matrices and drop them before the next unit is gathered.

Under FSDP2 (``fully_shard``) and tensor parallelism (Lightning's ``ModelParallelStrategy``) the weights
and their gradients are ``DTensor``: each rank holds a block of rows (``Shard(0)``) or of columns
(``Shard(1)``). :func:`full_gradient` gathers one layer's whole gradient (``full_tensor()``, a collective).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from gradspectra.capture.watched import WatchedParameter
from gradspectra.functional.reshape import as_matrix, is_conv1d

if TYPE_CHECKING:
    from torch.distributed.fsdp import FullyShardedDataParallel


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds an FSDP unit (``FullyShardedDataParallel``) anywhere in its tree.

    Example:
        >>> is_sharded(nn.Sequential(nn.Linear(2, 2)))
        False
    """
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def fsdp_groups(
    model: nn.Module, watched: Sequence[WatchedParameter]
) -> list[tuple[FullyShardedDataParallel | None, list[int]]]:
    """Watched weights grouped by the FSDP unit that shards them, units in module order.

    A weight belongs to the innermost ``FullyShardedDataParallel`` around the module that registers
    it. Each group is ``(unit, indices into watched)``; weights outside every unit (not sharded)
    form a group with unit ``None``, first. Units that shard no watched weight are left out. The
    order depends only on the model's structure, so it is the same on every rank.

    Raises:
        ValueError: when a watched weight is not a parameter of ``model``: FSDP with
            ``use_orig_params=False`` replaces the weights by one flat parameter per unit.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    unit_of: dict[int, FullyShardedDataParallel | None] = {}
    order: list[FullyShardedDataParallel | None] = [None]
    stack: list[tuple[nn.Module, FullyShardedDataParallel | None]] = [(model, None)]
    while stack:
        module, unit = stack.pop()
        if isinstance(module, FullyShardedDataParallel):
            unit = module
            order.append(module)
        for param in module.parameters(recurse=False):
            unit_of.setdefault(id(param), unit)
        # reversed, so that the stack pops children in module order
        stack.extend((child, unit) for child in reversed(list(module.children())))
    by_unit: dict[int, list[int]] = {}
    for i, w in enumerate(watched):
        if id(w.param) not in unit_of:
            raise ValueError(
                f"the watched weight {w.name!r} is no longer a parameter of the model. Under FSDP its gradient "
                "can only be gathered with `use_orig_params=True` (Lightning's FSDPStrategy default)."
            )
        by_unit.setdefault(id(unit_of[id(w.param)]), []).append(i)
    return [(unit, by_unit[id(unit)]) for unit in order if id(unit) in by_unit]


def sharded_gradients(
    model: nn.Module, watched: Sequence[WatchedParameter]
) -> Iterator[list[tuple[int, Tensor | None]]]:
    """Yield, one FSDP unit at a time, ``(index into watched, full gradient matrix or None)`` for its weights.

    Each unit is unsharded with ``summon_full_params(unit, recurse=False, writeback=False,
    with_grads=True)``: an all-gather of that unit's parameters and gradients, a collective, so
    every rank must iterate the generator to the end in step with the others. The matrices are
    views into the gathered buffers, valid only until the next item is requested: measure (or copy)
    them before then. At most one unit's full parameters and gradients are held at a time, never
    all of them. ``None`` marks a weight without a gradient (the same on every rank).

    Gradients outside every unit (modules the model did not wrap) are read as they are, first.
    Needs ``use_orig_params=True``.

    Raises:
        ValueError: see :func:`fsdp_groups`.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    for unit, indices in fsdp_groups(model, watched):
        if unit is None:
            yield [(i, watched[i].grad_matrix()) for i in indices]
            continue
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False, with_grads=True):
            yield [(i, watched[i].grad_matrix()) for i in indices]


# ---------------------------------------------------------------------------------------------- DTensor (FSDP2, TP)


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's ``fully_shard``, tensor parallel).

    Example:
        >>> is_dtensor(torch.zeros(2))
        False
    """
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def has_dtensors(watched: Sequence[WatchedParameter]) -> bool:
    """Whether any watched weight is a DTensor: its gradient is sharded across ranks (or replicated as one)."""
    return any(is_dtensor(w.param) for w in watched)


def full_gradient(w: WatchedParameter) -> Tensor | None:
    """The watched weight's whole gradient as an ``out x in`` matrix, ``None`` when it has none.

    A DTensor gradient is gathered with ``full_tensor()``: a collective over its device mesh, so every rank
    must call this for the same layers in the same order; the result is a plain tensor on every rank, held
    until the caller drops it. A plain gradient (a module left out of the sharding) is read as it is.
    """
    grad = w.param.grad
    if grad is None:
        return None
    if is_dtensor(grad):
        grad = grad.full_tensor()  # type: ignore[attr-defined]
    return matrix_of(grad, w)


def matrix_of(grad: Tensor, w: WatchedParameter) -> Tensor:
    """A whole (gathered or plain) gradient of ``w`` as its ``out x in`` matrix."""
    if grad.layout != torch.strided:
        grad = grad.to_dense()
    matrix = as_matrix(grad, w.module, include_embeddings=True)
    if matrix is None:
        raise ValueError(f"the gradient of {w.name!r} (shape {tuple(grad.shape)}) has no matrix form")
    return matrix


def block_axis(w: WatchedParameter, world: int) -> int | None:
    """The axis of the ``out x in`` matrix along which ranks hold blocks of ``w``'s gradient, or ``None`` when
    the cheap tier cannot read it as blocks (it is then gathered).

    Blocks are read where the weight is a DTensor on a one-dimensional device mesh of all ``world`` ranks with a
    single ``Shard`` placement of a 2-D weight: ``nn.Linear`` (``Shard(0)``: rows, FSDP2 and column-wise tensor
    parallelism; ``Shard(1)``: columns, row-wise) and GPT-2's ``Conv1D`` (stored ``in x out``: the other way).
    A plain weight, a replicated one, two-dimensional meshes and convolution kernels are gathered.
    """
    param = w.param
    if not is_dtensor(param) or param.ndim != 2:
        return None
    mesh, placements = param.device_mesh, param.placements  # type: ignore[attr-defined]
    if mesh.ndim != 1 or mesh.size() != world or len(placements) != 1 or not placements[0].is_shard():
        return None
    dim = int(placements[0].dim) % 2
    return 1 - dim if is_conv1d(w.module) else dim


def local_block(w: WatchedParameter, axis: int) -> Tensor | None:
    """This rank's block of ``w``'s gradient as rows (``axis=0``) or columns (``axis=1``) of the ``out x in``
    matrix, ``None`` when it has no gradient (a view of the local shard: nothing is gathered)."""
    grad = w.param.grad
    if grad is None:
        return None
    local: Tensor = grad.to_local() if is_dtensor(grad) else grad  # type: ignore[attr-defined]
    return local.mT if is_conv1d(w.module) else local


def mesh_position(w: WatchedParameter) -> int:
    """This rank's position on the device mesh of ``w`` (a DTensor on a one-dimensional mesh)."""
    position: int = w.param.device_mesh.get_local_rank()  # type: ignore[attr-defined]
    return position
