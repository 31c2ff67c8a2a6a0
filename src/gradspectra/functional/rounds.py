"""Estimators that read matrices held in blocks across processes, run in lockstep: one sum per product round.

The cheap tier's sketch (:mod:`.sketch`) and the deflated Lanczos estimator (:mod:`.estimate`) read their
matrices only through products they yield. With the matrices in blocks across processes, every process runs
the same estimators; each round, every estimator's product is this process's share (its block's part, zeros
elsewhere), and one sum over the processes per dtype gives every estimator its answer.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

import torch
from torch import Tensor

#: one estimator, started: its generator (yielding requests, sent answers) and this process's share of a request
Started = tuple[Generator[Any, Tensor, Any], Callable[[Any], Tensor]]


def sum_in_rounds(
    plans: Sequence[tuple[torch.dtype, Sequence[int]]],
    start: Callable[[], list[Started]],
    reduce_sum: Callable[[Tensor], Tensor],
    device: torch.device,
) -> list[Any]:
    """Run estimators in lockstep and return each one's return value.

    Args:
        plans: per estimator, its work dtype and the sizes (``numel``) of the answers it will ask for, in order:
            known before anything that may fail, and the same on every process.
        start: makes the estimators (``plans``' order), each with the request it yields first taken by this
            function; it may fail (out of memory).
        reduce_sum: a sum over the processes, called once per round and dtype, by every process alike.
        device: where the sums run.

    A process whose work fails (in ``start``, a share, or an estimator's own algebra) joins every remaining sum
    with zeros and raises after the last, so the others never wait in a sum it skipped.
    """
    dtypes = sorted({dtype for dtype, _ in plans}, key=str)
    failure: Exception | None = None
    runs: list[list[Any]] = []  # per estimator: [generator, share, pending request]
    try:
        runs = [[steps, share, next(steps)] for steps, share in start()]
    except Exception as err:
        failure = err
    results: list[Any] = [None] * len(plans)
    for r in range(max((len(sizes) for _, sizes in plans), default=0)):
        live = [k for k, (_, sizes) in enumerate(plans) if len(sizes) > r]
        flats: dict[torch.dtype, Tensor] = {}
        parts: dict[int, Tensor] = {}
        if failure is None:
            try:
                for k in live:
                    parts[k] = runs[k][1](runs[k][2])
                for dtype in dtypes:
                    chosen = [parts[k].reshape(-1) for k in live if plans[k][0] == dtype]
                    flats[dtype] = torch.cat(chosen) if chosen else torch.zeros(0, dtype=dtype, device=device)
            except Exception as err:
                failure = err
        summed: dict[torch.dtype, Tensor] = {}
        for dtype in dtypes:
            size = sum(plans[k][1][r] for k in live if plans[k][0] == dtype)
            flat = flats.get(dtype) if failure is None else None
            if flat is not None and flat.numel() != size:  # (the same on every process that gets here)
                failure = RuntimeError(f"round {r} of the block estimators: {flat.numel()} numbers, {size} planned")
            if flat is None or failure is not None:
                flat = torch.zeros(size, dtype=dtype, device=device)
            summed[dtype] = reduce_sum(flat)
        if failure is not None:
            continue
        try:
            offsets = dict.fromkeys(dtypes, 0)
            for k in live:
                dtype, part = plans[k][0], parts[k]
                at = offsets[dtype]
                offsets[dtype] = at + part.numel()
                try:
                    runs[k][2] = runs[k][0].send(summed[dtype][at : at + part.numel()].view(part.shape))
                except StopIteration as done:
                    results[k] = done.value
        except Exception as err:
            failure = err
    if failure is not None:
        raise failure
    return results
