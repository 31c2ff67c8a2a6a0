"""TensorBoard event files written by the engine itself, for front doors that bring no logger of their own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gradspectra.monitoring.engine import Outputs


class EventFiles:
    """A ``SummaryWriter`` in ``log_dir``, created at the first write and on rank 0 only.

    Scalars go to the same writer as the layout, figures and summary, under the same tags as the
    Lightning front door's (which logs through ``TensorBoardLogger``).
    """

    def __init__(self, log_dir: str | os.PathLike[str], is_zero: bool) -> None:
        self.log_dir = Path(log_dir)
        self.is_zero = is_zero
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def outputs(self) -> Outputs:
        if not self.is_zero:
            return Outputs()
        return Outputs(self.log_scalars, [self.writer], layer_runs_dir=self.log_dir / "layers")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
