"""Blurring diffusion (sigma_B,max 20) against its no-blur twin (sigma_B,max 0 = DDPM-style) on MNIST, same budget.

Both twins: the same net, data, seed, steps and batch, trained side by side with `diffcli train --process
blurring` (one CPU thread each, so they share the machine equally); each draws 1,000 samples with the same sampler
(the paper's ancestral step, 100 steps, labels cycling 0-9, seeds 0-999), the no-blur twin also with
`--clip-denoised` (DDPM's x0_hat clip; refused under blur), and is scored by `diffcli eval --digits --fid REF
--features mnist` against the held-out 5k MNIST training digits (PNGs). Every stage skips what is already done
and resumes what was cut off, so the script can be re-run after a kill:

    nohup nice -n 10 python benchmarks/blurring_vs_plain.py > blurring-mnist.log 2>&1 &

Prints (and writes to OUT/table.md) a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.mnist_data import DEFAULT_ROOT, heldout_5k  # noqa: E402
from diffcli.shared.checkpoints import load_checkpoint  # noqa: E402
from diffcli.shared.images import save_image

TWINS = {"blur20": 20.0, "blur0": 0.0}


def cli_args(*args) -> list[str]:
    print("$", "diffcli", *map(str, args), flush=True)
    return [sys.executable, "-m", "diffcli", *map(str, args)]


def cli(*args) -> None:
    subprocess.run(cli_args(*args), check=True, cwd=ROOT)


def train_command(run: Path, sigma: float, args) -> list[str] | None:
    """The command that trains (or resumes) one twin to args.steps; None if it is there already."""
    if (run / "model.safetensors").exists() and load_checkpoint(run / "model.safetensors")[1]["model"]["train_step"] >= args.steps:
        return None
    common = ["train", "--dataset", "mnist", "--data-root", args.data_root, "--split", "test", "--net", args.net,
              "--block-channels", args.block_channels, "--batch", args.batch, "--steps", args.steps,
              "--precision", "bf16", "--grid-every", 1000, "--ckpt-every", 100, "--log-every", args.log_every,
              "--out", run, "--device", "cpu"]
    if (run / "training-state.safetensors").exists():
        return cli_args(*common, "--resume")
    return cli_args(*common, "--process", "blurring", "--blur-sigma-max", sigma)


def train_twins(args) -> None:
    """Both twins at once, a thread each (bf16 autocast: 0.46 s/step each on this 2-core CPU, both running)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = [c for name, sigma in TWINS.items() if (c := train_command(args.out / name, sigma, args))]
    procs = [subprocess.Popen(c, cwd=ROOT, env=env) for c in commands]
    if any(p.wait() for p in procs):
        raise SystemExit("a twin's training failed (see above); re-run to resume it")


def train_minutes(log: list[dict]) -> float:
    """Wall time of a run from its log.jsonl, summed over resumed sessions (each restarts the clock)."""
    total, last = 0.0, 0.0
    for rec in log:
        if rec["time"] < last:
            total += last
        last = rec["time"]
    return (total + last) / 60


def write_reference(folder: Path, data_root: Path) -> None:
    if folder.is_dir() and len(list(folder.glob("*.png"))) == 5000:
        return
    images, _ = heldout_5k(data_root)
    for i, img in enumerate(images):
        save_image(folder / f"{i:05d}.png", img.float() / 127.5 - 1)


def sample_and_eval(run: Path, samples: Path, ref: Path, clip: bool, args) -> dict:
    """1,000 samples (resumable) and their eval.json."""
    record = samples / "run.json"
    if not (record.exists() and json.loads(record.read_text()).get("status") == "complete"):
        cli("sample", "--checkpoint", run, "--n", args.n, "--steps", args.sample_steps, "--batch-size", 250,
            "--out", samples, "--device", "cpu", *(["--clip-denoised"] if clip else []),
            *(["--resume"] if record.exists() else []))
    if not (samples / "eval.json").exists():
        cli("eval", samples, "--digits", "--fid", ref, "--features", "mnist", "--device", "cpu")
    return json.loads((samples / "eval.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "blurring-mnist")
    ap.add_argument("--data-root", default=str(DEFAULT_ROOT))
    ap.add_argument("--net", default="small")
    ap.add_argument("--block-channels", default="32,64,96")  # the shipped EDM model's net (1.8M parameters)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--log-every", type=int, default=50, help="training log.jsonl rows (train minutes come from it)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--sample-steps", type=int, default=100)
    ap.add_argument("--only-train", action="store_true")
    ap.add_argument("--no-clip", action="store_true", help="skip the no-blur twin's --clip-denoised row")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    if args.smoke:  # tests/test_benchmarks.py; options given on the command line still win
        ap.set_defaults(out=Path(tempfile.mkdtemp()), net="tiny", block_channels="8,16", batch=4, steps=2,
                        log_every=1, n=2, sample_steps=2, no_clip=True)
        args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_twins(args)
    if args.only_train:
        return
    ref = args.out / "ref5k"
    write_reference(ref, Path(args.data_root))
    rows = []
    for name, sigma in TWINS.items():
        log = [json.loads(line) for line in (args.out / name / "log.jsonl").read_text().splitlines()]
        for clip in (False, True) if sigma == 0 and not args.no_clip else (False,):  # no blur: also DDPM's clip
            samples = args.out / f"{name}-samples{'-clip' if clip else ''}"
            ev = sample_and_eval(args.out / name, samples, ref, clip, args)
            rows.append((name, sigma, log[-1]["step"], train_minutes(log), "yes" if clip else "no", ev["fid"]["value"],
                         ev["digits"].get("accuracy"), ev["digits"]["modes_discovered"]))
    table = ["| model | blur_sigma_max | train steps | train minutes | clip x0_hat | FID (mnist features) vs held-out 5k | "
             "class accuracy | classes found |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, sigma, steps, minutes, clip, fid, acc, modes in rows:
        table.append(f"| {name} | {sigma:g} | {steps} | {minutes:.0f} | {clip} | {fid:.1f} | {100 * acc:.1f} % | {modes} |")
    text = "\n".join(table)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
