"""Several processes (torchrun): one context for training (DDP) and for sharded sampling/evaluation.

`torchrun --nproc_per_node N diffcli sample ...` gives each rank every N-th sample; rank 0 prepares the output
folder and writes the merged grid and run.json once all ranks are done (as NVlabs/edm's generate.py does).
One process is the same code with world = 1.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence, TypeVar

import torch

from pathlib import Path

from .common import DiffcliError, begin_output, pick_device, write_run_json

T = TypeVar("T")


class Dist:
    """torchrun/DDP context: gloo on CPU, nccl on GPU; a no-op for one process."""

    def __init__(self, device_name: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1:
            import torch.distributed as dist
            use_cuda = torch.cuda.is_available() and device_name not in ("cpu",)
            dist.init_process_group("nccl" if use_cuda else "gloo")
            self.device = torch.device("cuda", self.local_rank) if use_cuda else torch.device("cpu")
            if use_cuda:
                torch.cuda.set_device(self.device)
        else:
            self.device = pick_device(device_name)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank if flag is true on any (so all ranks stop at the same step)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def __enter__(self) -> "Dist":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: every world-th item (seeds stay those of the items, so results match 1 rank)."""
        return list(items[self.rank::self.world])

    def gather(self, mine: Sequence[T]) -> list[T] | None:
        """The inverse of `shard`: every rank's results for its share, back in item order on rank 0 (None on the
        others)."""
        if self.world == 1:
            return list(mine)
        import torch.distributed as dist
        parts: list | None = [None] * self.world if self.main else None
        dist.gather_object(list(mine), parts, dst=0)
        if parts is None:
            return None
        merged: list = [None] * sum(len(p) for p in parts)
        for rank, part in enumerate(parts):
            merged[rank::self.world] = part
        return merged

    def raise_first(self, failure: tuple[int, DiffcliError] | None) -> None:
        """Stop every rank if any failed: each raises the failure of the lowest item index (the error one process
        meets first), so every rank prints the message one process would."""
        if self.world == 1:
            if failure is not None:
                raise failure[1]
            return
        import torch.distributed as dist
        failures: list = [None] * self.world
        dist.all_gather_object(failures, failure)
        failed = [f for f in failures if f is not None]
        if failed:
            raise min(failed, key=lambda f: f[0])[1]

    def main_first(self, fn: Callable[[], T], failure: str = "rank 0 refused to start (see its message)") -> T | None:
        """Run fn on rank 0 only (preparing the output folder), then let every rank stop if it failed (the others
        with the message `failure`)."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except DiffcliError as e:
                error = e
        if self.any(error is not None):
            raise error or DiffcliError(failure)
        self.barrier()
        return result

    def begin(self, out: Path, overwrite: bool, resume: bool, command: str, options: dict, **extra) -> Path:
        """Rank 0 prepares the output folder (`common.begin_output`) and, for a new run, writes a run.json with
        status "running" that a later --resume checks its options against; every rank waits for it."""
        def start() -> Path:
            folder = begin_output(out, overwrite, resume, options)
            if not resume:
                write_run_json(folder, command, options, self.device, status="running", **extra)
            return folder

        self.main_first(start)
        return Path(out)
