"""Sharded gradients (FSDP2, tensor parallel) measured where they lie: the cheap tier on each rank's blocks.

Under ``ModelParallelStrategy`` each rank holds a block of rows or columns of a watched layer's gradient.
Gathering a layer moves all of its ``m n`` entries; the Frobenius norm and the cheap tier need far less:

- **the Frobenius norm** of every layer from each rank's block (the squares summed across ranks);
- **the cheap tier** (spectral norm, stable rank, participation ratio) from three thin products per layer,
  each rank multiplying its own block (:func:`gradspectra.functional.sketch.cheap_spectral_metrics_blocks`):
  ``(b1 + 2 b2) (m + n)`` numbers a layer, for every layer in one sum per product;
- **the anchors' detection value** (the scorer's coarse effective rank) likewise, from 19 products
  (:func:`gradspectra.functional.detect.coarse_effective_rank_blocks`).

Only the layers whose owner plans a full spectrum this step (exact, estimated, audited) are gathered whole,
one at a time, to their owner alone, and the layers too small for the blocks to move less than a gather.
Which ones is agreed in the step's first sum: ``[whole?, cheap?, |block|_F^2, anchor?]`` for every layer and
a failure flag, from every rank, in one all-reduce. An anchor takes one route whatever the plan: on its
blocks where that moves less than gathering it (by its shape), else whole on its owner, so that its detection
value, a coarse estimate whose random start depends on the matrices it is computed with, stays steady.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradspectra.capture import WatchedParameter
from gradspectra.capture.sharded import block_axis, is_dtensor, local_block, mesh_position
from gradspectra.functional import frobenius_norms, is_conv1d
from gradspectra.functional.detect import coarse_effective_rank_blocks, detection_block_numbers
from gradspectra.functional.sketch import (
    CHEAP_METRICS,
    CheapSpectra,
    MatrixBlock,
    cheap_block_numbers,
    cheap_spectral_metrics_blocks,
    sketchable,
)
from gradspectra.monitoring.budget import Plan
from gradspectra.monitoring.distributed import Processes


@dataclass
class BlockStep:
    """What the ranks agreed on this step and what the blocks gave.

    Attributes:
        gather: the layers gathered whole this step (kept by their owners), in layer order.
        rows: the layers measured on their blocks (the cheap tier), in layer order.
        frobenius: ``(layers,)`` float64 Frobenius norms of every present layer from its blocks (NaN where
            the layer has no gradient or is gathered).
        cheap: the cheap tier of ``rows`` (the same on every rank), ``None`` when there are none.
        seconds: the time of the cheap tier on the blocks (every rank spends it on every such layer).
        sent: numbers this rank put into the step's sums (the agreement, the cheap tier's three products and the
            detection value's).
        failed_ranks: how many ranks' work failed before the agreement (then nothing else is done).
        detect: the anchor layers whose detection value comes from their blocks; ``detection`` their values
            (the same on every rank), ``detect_seconds`` its time.
    """

    gather: list[int]
    rows: list[int] = field(default_factory=list)
    failed_ranks: int = 0
    frobenius: Tensor | None = None
    cheap: CheapSpectra | None = None
    seconds: float = 0.0
    sent: int = 0
    detect: list[int] = field(default_factory=list)
    detection: Tensor | None = None
    detect_seconds: float = 0.0


class BlockTier:
    """The engine's measurement of sharded gradients on their blocks (module docstring)."""

    def __init__(self, watched: Sequence[WatchedParameter], world: int) -> None:
        self.watched = list(watched)
        self.world = world
        self.axes = [block_axis(w, world) for w in self.watched]
        self.distributed = [is_dtensor(w.param) for w in self.watched]  # the others are whole on every rank
        self.starts: list[int] | None = None  # each layer's first row/column on this rank (learned at step 1)
        self.sizes: Tensor | None = None  # (mesh positions, layers): every rank's block size along its axis
        self.on_blocks = True  # False: every layer gathered whole for its owner (spectra="exact")
        self.bases: dict[int, Tensor | None] = {}  # the cheap tier's warm starts (the same on every rank)
        self.calls = 0

    def _device(self) -> torch.device:
        """Where the sums run: the gradients' device (NCCL sums CUDA tensors only; gloo CPU ones)."""
        return self.watched[0].param.device

    def _learn_starts(self, procs: Processes) -> list[int]:
        """Each layer's block start on this rank: one sum of every rank's block sizes (the first step only)."""
        sizes = torch.zeros((self.world, len(self.watched)), dtype=torch.float64)
        for i, axis in enumerate(self.axes):
            if axis is None:
                continue
            w = self.watched[i]
            local = w.param.to_local()  # type: ignore[attr-defined]  # (the weight: sharded as its gradient)
            block = local.mT if is_conv1d(w.module) else local
            sizes[mesh_position(w), i] = float(block.shape[axis])
        sizes = procs.reduce_sum(sizes.to(self._device())).cpu()
        self.sizes = sizes.long()
        starts = [0] * len(self.watched)
        for i, axis in enumerate(self.axes):
            if axis is not None:
                position = mesh_position(self.watched[i])
                starts[i] = int(sizes[:position, i].sum().item())
        return starts

    def prepare(self, procs: Processes) -> None:
        """Learn every rank's block sizes and this rank's starts (a collective, the first step only)."""
        if self.starts is None:
            self.starts = self._learn_starts(procs)

    def to_owner(self, i: int, owner: int, rank: int) -> Tensor | None:
        """Layer ``i``'s whole gradient matrix on its ``owner`` rank (``None`` on the others), or ``NotImplemented``
        when the layer is not read as blocks (then it is gathered by ``full_tensor()``).

        One gather over the mesh's process group to the owner alone (blocks padded to the largest along their
        axis where they differ): ``m n`` entries reach the owner, and no other rank holds the whole matrix, where
        ``full_tensor()`` sends it to every rank. Every rank calls this for the same layers in the same order.
        What may fail on one rank (the buffers: out of memory) is done first, and a one-number sum over the group
        tells every rank whether any failed: then none gathers, and each raises (the layer's error is the step's).
        """
        axis = self.axes[i]
        if axis is None or self.sizes is None:
            return NotImplemented  # type: ignore[no-any-return]
        import torch.distributed as dist

        w = self.watched[i]
        local = local_block(w, axis)
        assert local is not None
        sizes = self.sizes[:, i].tolist()
        big = max(sizes)
        mesh = w.param.device_mesh  # type: ignore[attr-defined]
        group = mesh.get_group()
        ranks = [int(r) for r in mesh.mesh.flatten().tolist()]  # global ranks by mesh position
        shape = (big, local.shape[1]) if axis == 0 else (local.shape[0], big)
        failure: Exception | None = None
        received: Tensor | None = None
        try:
            if tuple(local.shape) == shape and local.is_contiguous():
                padded = local  # (even blocks of rows: sent as they are)
            else:
                padded = torch.zeros(shape, dtype=local.dtype, device=local.device)
                (padded[: local.shape[0]] if axis == 0 else padded[:, : local.shape[1]]).copy_(local)
            if rank == owner:
                received = torch.empty((len(ranks), *shape), dtype=local.dtype, device=local.device)
        except Exception as err:
            failure = err
        flag = torch.tensor([0.0 if failure is None else 1.0], device=local.device)
        dist.all_reduce(flag, group=group)
        if flag.item() > 0:
            raise failure or RuntimeError(f"gathering {w.name} failed on another rank")
        gather_list = None
        if received is not None:
            by_group = sorted(range(len(ranks)), key=lambda p: dist.get_group_rank(group, ranks[p]))
            gather_list = [received[p] for p in by_group]
        dist.gather(padded, gather_list, dst=owner, group=group)
        if received is None:
            return None
        if axis == 0 and all(size == big for size in sizes):
            return received.view(len(ranks) * big, shape[1])  # (in position order: the matrix itself)
        trimmed = [piece[:size] if axis == 0 else piece[:, :size] for piece, size in zip(received, sizes)]
        return torch.cat(trimmed, dim=axis)

    def agree(
        self,
        present: list[int],
        owners: Sequence[int],
        plan: Plan | None,
        procs: Processes,
        metric_names: Sequence[str],
        failed: bool = False,
    ) -> BlockStep:
        """Every rank's wishes for its own layers in one sum: which are gathered whole, which take the cheap
        tier on their blocks, every block's sum of squares (the Frobenius norms), and whether its work failed
        so far (``failed``, or reading its blocks here). A rank that failed still joins the sum; when any rank
        did, every rank leaves the step's gathers and products alike (``failed_ranks``)."""
        n = len(self.watched)
        self.prepare(procs)
        table = torch.zeros(4 * n + 1, dtype=torch.float64)
        blocks = [i for i in present if self.axes[i] is not None]
        try:
            mine = {i for i in present if owners[i] == procs.rank}
            whole: set[int] = set()
            cheap: set[int] = set()
            detect: set[int] = set()
            if plan is not None:
                whole = (set(plan.exact) | set(plan.estimate) | set(plan.audit)) & mine
                cheap = (set(plan.cheap) & mine) - whole
                detect = (set(plan.detect) & mine) - whole
            table[sorted(whole)] = 1.0
            if any(name in CHEAP_METRICS for name in metric_names):
                table[[n + i for i in sorted(cheap)]] = 1.0
            table[[3 * n + i for i in sorted(detect)]] = 1.0
            local = [local_block(self.watched[i], self.axes[i]) for i in blocks]  # type: ignore[arg-type]
            if blocks:
                norms = frobenius_norms([b for b in local if b is not None]).cpu()
                table[[2 * n + i for i in blocks]] = norms.square()
        except Exception:
            failed = True
        table[4 * n] = float(failed)
        table = procs.reduce_sum(table.to(self._device())).cpu()
        if table[4 * n] > 0:
            return BlockStep([], failed_ranks=int(table[4 * n].item()))
        frobenius = torch.full((n,), float("nan"), dtype=torch.float64)
        frobenius[blocks] = table[[2 * n + i for i in blocks]].sqrt()
        # the same on every rank: the layers wanted whole, those that cannot be read as blocks, and cheap ones
        # the sketch does not take (small, or extreme magnitudes: the exact route); the anchors' detection value
        # on their blocks too (a layer also wanted whole gets it from its matrix)
        # where its products would send more numbers than the layer has entries (small layers), a layer is
        # gathered to its owner instead: the blocks pay only where they move less
        agreed_cheap = [i for i in blocks if table[n + i] > 0]
        anchors = [i for i in present if table[3 * n + i] > 0]
        # an anchor's route depends on its shape only (steady values): its blocks where they move less
        on_blocks = [i for i in anchors if self.axes[i] is not None and self._detect_on_blocks(i)]
        gather = {i for i in present if table[i] > 0 or self.axes[i] is None}
        gather |= {i for i in anchors if i not in on_blocks}
        gather |= {i for i in agreed_cheap if not sketchable(self._shape(i), float(frobenius[i]))}
        for i in agreed_cheap:
            numbers = cheap_block_numbers(self._shape(i)) + (
                detection_block_numbers(self._shape(i)) if i in on_blocks else 0
            )
            if numbers >= self._entries(i):
                gather.add(i)
        step = BlockStep(sorted(gather), [i for i in agreed_cheap if i not in gather], frobenius=frobenius)
        step.detect = on_blocks  # (even if the layer is gathered for another reason: one route for an anchor)
        step.sent = 4 * n + 1
        return step

    def measure(self, step: BlockStep, procs: Processes) -> BlockStep:
        """The cheap tier of ``step.rows`` on the blocks (every rank takes part in every layer; a rank whose
        share fails joins the sums with zeros and raises after them, so the others never wait)."""
        if not step.rows:
            return step
        assert step.frobenius is not None
        t0 = time.perf_counter()
        blocks = self._blocks(step.rows)
        self.calls += 1
        sent = [0]
        summed = _counting(procs, sent)
        step.cheap = cheap_spectral_metrics_blocks(
            blocks,
            step.frobenius[step.rows],
            summed,
            warm_start=[self.bases.get(i) for i in step.rows],
            seed=self.calls,
        )
        for k, i in enumerate(step.rows):
            self.bases[i] = step.cheap.bases[k]
        step.seconds = time.perf_counter() - t0
        step.sent += sent[0]
        return step

    def detect(self, step: BlockStep, procs: Processes) -> BlockStep:
        """The detection value of the anchors ``step.detect`` on their blocks (every rank takes part)."""
        if not step.detect:
            return step
        assert step.frobenius is not None
        t0 = time.perf_counter()
        blocks = self._blocks(step.detect)
        sent = [0]
        summed = _counting(procs, sent)
        step.detection = coarse_effective_rank_blocks(blocks, step.frobenius[step.detect], summed)
        step.detect_seconds = time.perf_counter() - t0
        step.sent += sent[0]
        return step

    def _blocks(self, rows: Sequence[int]) -> list[MatrixBlock]:
        """This rank's block of each layer of ``rows`` (views of the local shards)."""
        assert self.starts is not None
        blocks = []
        for i in rows:
            axis = self.axes[i]
            local = local_block(self.watched[i], axis)  # type: ignore[arg-type]
            assert axis is not None and local is not None
            blocks.append(MatrixBlock(local.detach(), self._shape(i), axis, self.starts[i]))
        return blocks

    def _detect_on_blocks(self, i: int) -> bool:
        return detection_block_numbers(self._shape(i)) < self._entries(i)

    def _entries(self, i: int) -> int:
        m, n = self._shape(i)
        return m * n

    def _shape(self, i: int) -> tuple[int, int]:
        """The whole ``out x in`` matrix's shape (GPT-2's ``Conv1D`` is stored ``in x out``)."""
        w = self.watched[i]
        m, n = int(w.param.shape[0]), int(w.param.shape[1])
        return (n, m) if is_conv1d(w.module) else (m, n)


def _counting(procs: Processes, sent: list[int]) -> Callable[[Tensor], Tensor]:
    """``procs.reduce_sum`` that adds the numbers it sends to ``sent[0]``."""

    def summed(t: Tensor) -> Tensor:
        sent[0] += t.numel()
        return procs.reduce_sum(t)

    return summed
