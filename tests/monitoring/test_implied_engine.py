"""The engine with frozen layers measured by their implied gradient: what it refuses, and says so."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gradspectra.monitoring import MonitorConfig, MonitorEngine


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp_with_implied_layers_is_refused_with_what_to_do(tmp_path: Path) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    engine = MonitorEngine(MonitorConfig(include="*.weight", figure_every_n_steps=0, verbose=False))
    engine.attach(model)
    assert [w.implied for w in engine.watched] == [True, False]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_port()}", rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
        with pytest.raises(ValueError, match=r"not under FSDP yet; pass gradients='parameters'"):
            engine.open(tmp_path / "batches.jsonl", write=False, wrapped=wrapped)
    finally:
        engine.close()
        dist.destroy_process_group()
