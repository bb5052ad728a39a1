"""A process's place in a torchrun job over several nodes: the global rank decides the work
(shards, batches), the local rank the device."""

import torch
import torch.distributed

from samkd.extract import rank_images
from samkd.runtime import Distributed, device_for, init_distributed
from samkd.settings import load_settings
from samkd.train.setup import step_batches


def test_the_rank_is_global_and_the_device_local(monkeypatch) -> None:
    """Rank 3 of 4 on a node of two: the second GPU of its node (LOCAL_RANK 1)."""
    for name, value in {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    backends: list[str] = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend: backends.append(backend)
    )
    dist = init_distributed("cpu")
    assert dist == Distributed(rank=3, local_rank=1, world_size=4) and backends == ["gloo"]
    assert device_for(dist, torch.device("cuda")) == torch.device("cuda", 1)
    assert device_for(dist, torch.device("cpu")) == torch.device("cpu")


def test_the_global_rank_picks_the_shards_and_the_batches() -> None:
    node_two = Distributed(rank=3, local_rank=1, world_size=4)
    assert rank_images(16, 2, node_two) == [6, 7, 14, 15]  # shards 3 and 7
    settings = load_settings(None, ["train.batch_size=8"], environ={})
    order = next(step_batches(8, settings, 0, 0, Distributed()))
    assert next(step_batches(8, settings, 0, 0, node_two)) == order[6:8]
