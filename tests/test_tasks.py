"""The task loop every generating command runs (shared/tasks.py): resume filter, rank shares, writes, finish."""
from __future__ import annotations

from pathlib import Path

from diffcli.shared.tasks import Task, run_tasks


class FakeDist:
    """Rank `rank` of `world` (Dist's share rule), without a process group."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.barriers = rank, world, 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items):
        return list(items[self.rank::self.world])

    def barrier(self) -> None:
        self.barriers += 1


def write(path: Path, text: str) -> None:
    path.write_text(text)


def run(folder: Path, dist: FakeDist, resume: bool, seen: list, finished: list):
    tasks = [Task(k, (folder / f"{k}a.txt", folder / f"{k}b.txt")) for k in range(5)]

    def compute(mine, advance):
        for task in mine:
            seen.append((task.item, [p.name for p in task.missing]))
            advance(1)
            yield from ((p, write, f"{task.item}") for p in task.files)

    return run_tasks(dist, tasks, compute, resume=resume, label="test", work=lambda task: 1,
                     finish=lambda done: finished.append(done.skipped))


def test_ranks_share_the_pending_tasks_and_only_rank_0_finishes(tmp_path):
    seen, finished, writes = [], [], []
    for rank in (0, 1):
        dist = FakeDist(rank, 2)
        done = run(tmp_path, dist, False, seen, finished)
        writes.append([t.item for t in done.mine])
        assert dist.barriers == 1
    assert writes == [[0, 2, 4], [1, 3]] and finished == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{k}{s}.txt" for k in range(5) for s in "ab")


def test_resume_skips_finished_tasks_and_never_rewrites_a_file(tmp_path):
    for k in range(5):
        for s in "ab":
            (tmp_path / f"{k}{s}.txt").write_text("old")
    (tmp_path / "1b.txt").unlink()
    (tmp_path / "3a.txt").unlink()
    seen, finished = [], []
    done = run(tmp_path, FakeDist(0, 1), True, seen, finished)
    assert seen == [(1, ["1b.txt"]), (3, ["3a.txt"])] and finished == [3] and done.skipped == 3
    assert (tmp_path / "1a.txt").read_text() == "old" and (tmp_path / "1b.txt").read_text() == "1"
    assert (tmp_path / "3a.txt").read_text() == "3" and (tmp_path / "3b.txt").read_text() == "old"
