"""Multi-process helpers of the engine: who measures which layer, the one all-reduce, FSDP gathers, sample ids.

Nothing here knows a training framework: a front door hands in its rank, world size and a sum
all-reduce (Lightning's ``strategy.reduce``, or :func:`all_reduce_sum` over ``torch.distributed``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradspectra.capture import WatchedParameter
from gradspectra.capture.sharded import is_dtensor, matrix_of, sharded_gradients
from gradspectra.monitoring.budget import EXACT, work_flops

ReduceSum = Callable[[Tensor], Tensor]


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over every process of the default ``torch.distributed`` group (the tensor itself when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def default_process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the default ``torch.distributed`` group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class Processes:
    """Where this process stands: its global rank, how many processes train, and how to sum across them."""

    rank: int = 0
    world: int = 1
    reduce_sum: ReduceSum = field(default=all_reduce_sum, compare=False)

    @property
    def is_zero(self) -> bool:
        return self.rank == 0


def layer_owners(shapes: Sequence[tuple[int, int]], world: int) -> list[int]:
    """Rank that measures each layer: longest-processing-time first, by the budget's exact-work cost model.

    Example:
        >>> layer_owners([(64, 64), (8, 8), (64, 64), (8, 8)], 2)
        [0, 0, 1, 1]
    """
    costs = [work_flops(EXACT, shape) for shape in shapes]
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def pack(parts: Sequence[Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
    """One flat tensor of ``parts`` (so they travel in one collective or one device-to-host copy)."""
    return torch.cat([p.reshape(-1).to(dtype) for p in parts])


def unpack(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """The inverse of :func:`pack`: pieces shaped like ``like``."""
    pieces = torch.split(flat, [t.numel() for t in like])
    return [piece.view(t.shape) for piece, t in zip(pieces, like)]


def gather_sharded(
    model: nn.Module, watched: Sequence[WatchedParameter], owners: Sequence[int], rank: int, world: int
) -> tuple[list[int], list[Tensor]]:
    """Under FSDP: the watched layers that have a gradient, and their full matrices where this rank owns them.

    Units are gathered one at a time (a collective: every rank takes part); the owner copies its
    layers' matrices out of the gathered buffer, the other ranks keep an empty placeholder. So a
    rank holds its own layers' full gradients plus one unit in transit, never all of them.
    """
    found: list[tuple[int, Tensor]] = []
    for unit in sharded_gradients(model, watched):
        for i, g in unit:
            if g is not None:
                found.append((i, g.clone() if world == 1 or owners[i] == rank else g.new_empty(0)))
    found.sort(key=lambda item: item[0])
    return [i for i, _ in found], [g for _, g in found]


def gather_dtensors(
    watched: Sequence[WatchedParameter],
    owners: Sequence[int],
    rank: int,
    world: int,
    rows: Sequence[int] | None = None,
    to_owner: Callable[[int, int, int], Tensor | None] | None = None,
) -> tuple[list[int], list[Tensor], list[str]]:
    """Under FSDP2 / tensor parallelism: the watched layers that have a gradient, their whole matrices where this
    rank owns them (an empty placeholder elsewhere), and what went wrong on this rank.

    One layer at a time (``full_tensor()``, a collective: every rank walks the same ``rows`` in the same order),
    so a rank holds its own layers' matrices plus one layer in transit, never every layer's. A failure after a
    layer's gather (its matrix could not be kept) leaves an empty placeholder and goes on with the next, so the
    other ranks never wait; the failures are returned (the caller fails the step in its all-reduce).
    ``to_owner(i, owner, rank)``, when given, gathers a layer to its owner alone (``None`` elsewhere;
    ``NotImplemented``: not for this layer, ``full_tensor()`` then).
    """
    present: list[int] = []
    matrices: list[Tensor] = []
    errors: list[str] = []
    for i in range(len(watched)) if rows is None else rows:
        w = watched[i]
        grad = w.param.grad
        if grad is None:
            continue
        try:
            g = NotImplemented if to_owner is None or not is_dtensor(grad) else to_owner(i, owners[i], rank)
            if g is NotImplemented:
                whole = grad.full_tensor() if is_dtensor(grad) else grad  # type: ignore[attr-defined]
                g = matrix_of(whole, w)
        except Exception as err:  # e.g. out of memory on the owner, after the collective
            # still present (an empty placeholder): the step goes on to its all-reduce, which says it failed
            errors.append(f"{type(err).__name__}: {err}")
            g = None
        present.append(i)
        if isinstance(g, Tensor) and (world == 1 or owners[i] == rank):
            matrices.append(g)
        else:
            matrices.append(torch.empty(0, dtype=grad.dtype, device=grad.device))
    return present, matrices, errors


def gather_ids(ids: list[Any], world: int) -> list[Any]:
    """Every rank's sample ids of this step, rank 0's first (one collective; every rank calls it)."""
    import torch.distributed as dist

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return ids
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, list(ids))
    return [i for part in gathered for i in (part or [])]
