"""Several processes (torchrun): one context for training (DDP) and for sharded sampling/evaluation.

`torchrun --nproc_per_node N diffcli sample ...` gives each rank every N-th sample; rank 0 prepares the output
folder and writes the merged grid and run.json once all ranks are done (as NVlabs/edm's generate.py does).
One process is the same code with world = 1. The functions below `Dist` share per-item work (reading files,
running a network on whole batches) among the ranks so that rank 0 ends with what one process computes.
"""
from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist

from .errors import DiffcliError
from . import image_settings
from .inputs import env_number
from .records import begin_output, note_run, write_run_json
from .devices import pick_device
from .limits import WORLD_MAX

T, R = TypeVar("T"), TypeVar("R")
Rows = Any  # a tensor or an array with one row per item, or a tuple of them

TIMEOUT_ENV = "DIFFCLI_DIST_TIMEOUT"  # seconds the torchrun rendezvous waits for every rank to join
TIMEOUT_DEFAULT = 300.0               # (torch's own wait is 30 minutes)
TIMEOUT_MIN, TIMEOUT_MAX = 0.001, 1e6  # a timedelta holds ~10^14 s; 10^6 s is 11 days


def rendezvous_timeout() -> float:
    """DIFFCLI_DIST_TIMEOUT in seconds (default 300): how long the ranks wait for each other at the start."""
    return float(env_number(TIMEOUT_ENV, TIMEOUT_DEFAULT, TIMEOUT_MIN, TIMEOUT_MAX,
                            meaning=f"seconds torchrun ranks wait for each other at the start; default "
                                    f"{TIMEOUT_DEFAULT:g}"))


def init_group(backend: str, world: int) -> None:
    """torch's env:// rendezvous, bounded by `rendezvous_timeout` (a rank whose peers never come fails in one
    line instead of waiting torch's 30 minutes); the collectives after it keep torch's default timeout."""
    seconds = rendezvous_timeout()
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        with _native_stderr_hidden():  # torch's C++ store logs each failed try with a stack trace
            store, rank, size = next(torch_dist.rendezvous("env://", timeout=timedelta(seconds=seconds)))
    except (RuntimeError, ValueError, OSError) as e:  # DistStoreError / DistNetworkError are RuntimeErrors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DiffcliError(f"torchrun rendezvous at {where}: not all {world} ranks joined within {seconds:g} s "
                           f"({reason}); start every rank, or set {TIMEOUT_ENV}=SECONDS to wait longer "
                           f"(default {TIMEOUT_DEFAULT:g})") from None
    from torch.distributed.constants import default_pg_timeout
    store.set_timeout(default_pg_timeout)  # as init_process_group does with its own rendezvous
    torch_dist.init_process_group(backend, store=torch_dist.PrefixStore("default_pg", store), rank=rank,
                                  world_size=size)


@contextlib.contextmanager
def _native_stderr_hidden():
    """File descriptor 2 (where C++ code logs) to /dev/null for the duration; Python's own messages come after."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def env_int(name: str, default: int, low: int, high: int) -> int:
    """An integer torchrun sets in the environment (WORLD_SIZE, RANK, LOCAL_RANK), checked (`inputs.env_number`)."""
    return env_number(name, default, low, high, integer=True, meaning="torchrun sets it; unset it to run one process")


class Dist:
    """torchrun/DDP context: gloo on CPU, nccl on GPU; a no-op for one process."""

    def __init__(self, device_name: str | None):
        self.world = env_int("WORLD_SIZE", 1, 1, WORLD_MAX)
        self.rank = env_int("RANK", 0, 0, self.world - 1)
        self.local_rank = env_int("LOCAL_RANK", 0, 0, WORLD_MAX - 1)
        self.owner = self.world > 1 and not torch_dist.is_initialized()  # a sweep's group serves its commands
        if self.world > 1:
            use_cuda = torch.cuda.is_available() and device_name not in ("cpu",)
            if self.owner:
                init_group("nccl" if use_cuda else "gloo", self.world)
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
        t = torch.tensor([float(flag)], device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def __enter__(self) -> "Dist":
        self._settings = image_settings.keep()  # the run noted inside (`begin`) ends with the block
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if getattr(self, "_settings", None) is not None:
            image_settings.restore(self._settings)
            self._settings = None
        if exc_type is None:
            self.barrier()  # every rank leaves after rank 0 wrote the outputs (a sweep's next step reads them)
        self.close()

    def close(self) -> None:
        if self.owner:
            torch_dist.destroy_process_group()
            self.owner = False

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: every world-th item (seeds stay those of the items, so results match 1 rank)."""
        return list(items[self.rank::self.world])

    def gather(self, mine: Sequence[T]) -> list[T] | None:
        """The inverse of `shard`: every rank's results for its share, back in item order on rank 0 (None on the
        others)."""
        if self.world == 1:
            return list(mine)
        parts: list | None = [None] * self.world if self.main else None
        torch_dist.gather_object(list(mine), parts, dst=0)
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
        failures: list = [None] * self.world
        torch_dist.all_gather_object(failures, failure)
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

    def begin(self, out: Path, overwrite: bool, resume: bool, command: str, options: dict,
              record_path: Path | None = None, beside_folders: Sequence[Path] = (), **extra) -> Path:
        """Rank 0 prepares the output folder (`shared.records.begin_output`) and, for a new run, writes a run record with
        status "running" that a later --resume checks its options against; every rank waits for it. The record is
        OUT/run.json, or `record_path` beside OUT (panorama, anagram: with `beside_folders`, see `shared.records.beside`)."""
        def start() -> Path:
            folder = begin_output(out, overwrite, resume, options, record_path=record_path,
                                  beside_folders=beside_folders)
            if not resume:
                write_run_json(folder, command, options, self.device, record_path=record_path, status="running",
                               **extra)
            return folder

        note_run(command, options, self.device)  # every rank's images carry the run's settings, resumed or not
        self.main_first(start)
        return Path(out)


# ---------------------------------------------------------------- per-item work shared among the ranks

def read_each(dist: Dist | None, paths: Sequence[T], read: Callable[[T], R],
              mine: Sequence[T] | None = None) -> list[R]:
    """read(path) for this rank's paths `mine` (default: its `Dist.shard` of `paths`; one process: all of them).

    A file that cannot be read stops every rank with the error one process gives: the first bad file in `paths`.
    """
    if dist is None or dist.world == 1:
        return [read(p) for p in paths]
    out, failure = [], None
    for p in dist.shard(paths) if mine is None else mine:
        try:
            out.append(read(p))
        except DiffcliError as e:
            failure = (paths.index(p), e)
            break
    dist.raise_first(failure)
    return out


def batch_share(dist: Dist, items: Sequence[T], batch_size: int) -> list[T]:
    """This rank's whole batches of items (every world-th one): each batch holds the images one process batches
    together, so every image's features come out bitwise the same as with one process."""
    if dist.world == 1:
        return list(items)
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return [x for batch in dist.shard(batches) for x in batch]


def _rows(x: Rows, rows: slice) -> Rows:
    return tuple(_rows(t, rows) for t in x) if isinstance(x, tuple) else x[rows]


def _cat(parts: list[Rows]) -> Rows:
    if isinstance(parts[0], tuple):
        return tuple(_cat(list(p)) for p in zip(*parts))
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


def per_image(dist: Dist, mine: Sequence[T], batch_size: int, compute: Callable[[Sequence[T]], Rows]) -> Rows | None:
    """compute(mine) -> one row per item of this rank's `batch_share`; every rank's rows in item order on rank 0
    (None on the others)."""
    if dist.world == 1:
        return compute(mine)
    rows = compute(mine) if mine else None
    parts = dist.gather([_rows(rows, slice(i, i + batch_size)) for i in range(0, len(mine), batch_size)])
    return None if parts is None else _cat(parts)
