"""The task loop every generating command runs (sample, seg, panorama, anagram, pg).

A run is a list of tasks (a block of samples, a prompt, a particle set), each naming the files it writes. The loop
skips the tasks whose files are all there (--resume), gives this torchrun rank every world-th of the others
(`Dist.shard`; seeds stay those of the tasks, so any number of ranks writes what one process writes), runs the
command's `compute` over them with a progress bar, writes what it yields, waits for every rank and lets rank 0
finish the run (merged pictures, run.json). The output folder is prepared before, by `Dist.begin`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Sequence, TypeVar

from .dist import Dist
from .progress import progress_bar

T = TypeVar("T")

# What `compute` yields: (path, save, *args); the loop calls save(path, *args), a writer that writes `path`
# atomically (shared.images.save_image / save_grid / save_gif, shared.checkpoints.save_checkpoint).
Output = tuple


@dataclass(frozen=True)
class Task(Generic[T]):
    item: T                           # what `compute` works on
    files: tuple[Path, ...]           # every file the task writes: it is finished when all of them exist
    missing: tuple[Path, ...] = ()    # set by run_tasks: those of `files` not on disk yet (all without --resume)


@dataclass(frozen=True)
class Done(Generic[T]):
    tasks: list[Task[T]]
    pending: list[Task[T]]            # the tasks not finished before the run
    mine: list[Task[T]]               # this rank's share of them
    present: frozenset[Path]          # the tasks' files found on disk before the run (--resume)
    main: bool                        # rank 0

    @property
    def skipped(self) -> int:
        """Tasks finished before the run."""
        return len(self.tasks) - len(self.pending)


def run_tasks(dist: Dist, tasks: Sequence[Task[T]],
              compute: Callable[[list[Task[T]], Callable[[int], None]], Iterable[Output]], *, resume: bool,
              label: str, work: Callable[[Task[T]], int], finish: Callable[[Done[T]], Any] | None = None) -> Done[T]:
    """Run `tasks` on this rank: compute(mine, advance) gets this rank's unfinished tasks (each with its `missing`
    files) and yields the outputs to write as they are ready, calling advance(k) as its work goes (`work(task)`:
    a task's units on the bar). A file already there when the run began is never written again (a task that must
    recompute whole, a PG particle set, leaves what is on disk as it is). Then every rank waits for the others,
    and rank 0 runs `finish`."""
    tasks = list(tasks)
    present = frozenset(f for task in tasks for f in task.files if resume and f.is_file())
    pending = [replace(task, missing=tuple(f for f in task.files if f not in present)) for task in tasks]
    pending = [task for task in pending if task.missing]
    mine = dist.shard(pending)
    with progress_bar(label, sum(work(task) for task in mine), disable=not dist.main) as advance:
        for path, save, *args in compute(mine, advance):
            if path not in present:
                save(path, *args)
    dist.barrier()
    done = Done(tasks, pending, mine, present, dist.main)
    if dist.main and finish is not None:
        finish(done)
    return done
