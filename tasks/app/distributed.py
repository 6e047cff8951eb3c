"""What each process of a distributed run holds, gathered into one checkpoint and handed back.

Lightning builds a checkpoint on every process and writes rank zero's; state that differs from
rank to rank (random generators, accumulated gradients) is therefore gathered from all of them
while the checkpoint is built, and each process takes its own back when it is loaded.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(value: Any) -> list[Any]:
    """``value`` of every process, by rank; every process must call it."""
    rank, world = rank_and_world()
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def mine(values: list[Any], what: str) -> Any:
    """This process's entry of what :func:`gather` returned when the checkpoint was built; rank
    zero's, with a warning that says so, when the run has another number of processes."""
    rank, world = rank_and_world()
    if len(values) != world:
        warnings.warn(
            f"the checkpoint holds the {what} of {len(values)} processes and this run has "
            f"{world}: each process takes rank 0's, so the run will not match an uninterrupted "
            "one",
            stacklevel=2,
        )
        rank = 0
    return values[rank]
