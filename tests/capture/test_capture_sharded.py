"""gradspectra.capture.sharded on a real FSDP model in one CPU process (gloo, world size 1).

The 2-process case, where the gradients are split across ranks, is tested end to end in
tests/callbacks/test_fsdp.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from gradspectra.capture import select_parameters
from gradspectra.capture.sharded import fsdp_groups, is_sharded, sharded_gradients

# one process: FSDP says it falls back to NO_SHARD, which still goes through summon_full_params
pytestmark = pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(6) for _ in range(3)])
        self.conv = nn.Conv1d(6, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return self.head(self.conv(x[:, :, None].expand(-1, -1, 5)).mean(-1))


@pytest.fixture
def group() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _wrap(model: nn.Module, use_orig_params: bool = True) -> FullyShardedDataParallel:
    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=ModuleWrapPolicy({Block}),
        device_id=torch.device("cpu"),
        use_orig_params=use_orig_params,
    )


def test_full_gradients_one_unit_at_a_time(group: None) -> None:
    torch.manual_seed(0)
    net = Net()
    reference = Net()
    reference.load_state_dict(net.state_dict())
    x = torch.randn(8, 6)
    reference(x).square().mean().backward()
    watched = select_parameters(net).watched  # selected before wrapping, as the monitor's setup does
    assert not is_sharded(net)
    model = _wrap(net)
    assert is_sharded(model)
    model(x).square().mean().backward()

    groups = fsdp_groups(model, watched)
    # one unit per block, then the root unit holding conv and head; no weight outside a unit
    assert [type(unit.module).__name__ for unit, _ in groups if unit is not None] == ["Net", "Block", "Block", "Block"]
    assert sorted(i for _, indices in groups for i in indices) == list(range(len(watched)))
    assert [watched[i].name for i in groups[0][1]] == ["conv.weight", "head.weight"]

    expected = {w.name: w.grad_matrix() for w in select_parameters(reference).watched}
    seen = []
    for unit in sharded_gradients(model, watched):
        for i, g in unit:
            assert g is not None
            torch.testing.assert_close(g, expected[watched[i].name])
            seen.append(watched[i].name)
    assert sorted(seen) == sorted(expected)
    assert watched[groups[0][1][0]].grad_matrix() is not None
    assert tuple(watched[groups[0][1][0]].grad_matrix().shape) == (4, 18)  # conv kernel flattened, full size


def test_flattened_weights_are_refused(group: None) -> None:
    net = Net()
    watched = select_parameters(net).watched
    model = _wrap(net, use_orig_params=False)
    with pytest.raises(ValueError, match="use_orig_params=True"):
        fsdp_groups(model, watched)
