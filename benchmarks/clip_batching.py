"""CLIP-score throughput: `diffcli eval`'s batched scoring against the 003 grader's one-image-at-a-time loop.

    OMP_NUM_THREADS=1 python benchmarks/clip_batching.py [--clip-model ViT-B-32] [--clip-pretrained FILE]
                                                         [--prompts 10] [--crops 8] [--batch-size 64]

Writes 003-style 512x512 crops (<prompt>_<pos>.png) to a temp folder and scores them both ways on the same model.
Without --clip-pretrained the model keeps its random initialisation (the speed does not depend on the weights).
Both ways must give the same scores (asserted); prints images/s of each and their ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from diffcli.backends.clip_model import Clip, embed_image_files, embed_prompts, load_clip, resolve_clip_model  # noqa: E402
from diffcli.shared.libraries import quiet_libraries  # noqa: E402
from diffcli.data.grading import group_prompts, plan_clip_files  # noqa: E402
from diffcli.data.image_folders import check_images  # noqa: E402
from diffcli.core.metrics import cosine_per_image, group_means  # noqa: E402


def write_crops(folder: Path, prompts: int, crops: int, size: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for p in range(prompts):
        for c in range(crops):
            base = np.stack([np.sin(6 * xx + p), np.cos(5 * yy + c), xx * yy], -1) * 90 + 128
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"A_test_prompt_number_{p}_{137 * c + 11}.png")


def random_clip(spec: str) -> Clip:
    import open_clip
    name = resolve_clip_model(spec)
    with quiet_libraries():
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, force_quick_gelu=True)
    return Clip(model.eval(), preprocess, open_clip.get_tokenizer(name), torch.device("cpu"), name, "random", True)


def one_at_a_time(clip: Clip, folder: Path) -> dict[str, float]:
    """The grader's loop: each image and its prompt encoded on their own."""
    scores = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".png"):
            continue
        prompt = " ".join(name[:-4].split("_")[:-1])
        with torch.no_grad():
            image = clip.model.encode_image(clip.preprocess(Image.open(folder / name).convert("RGB")).unsqueeze(0))
            text = clip.model.encode_text(clip.tokenizer([prompt]))
            image = image / image.norm(dim=-1, keepdim=True)
            text = text / text.norm(dim=-1, keepdim=True)
        scores[name] = (image @ text.T).item()
    return scores


def batched(clip: Clip, folder: Path, batch_size: int) -> dict[str, float]:
    """What `diffcli eval --app wide_images` runs, name check and image check included."""
    files, _ = plan_clip_files(str(folder), "wide_images")
    check_images([f.path for f in files])
    prompts, _, index = group_prompts(files)
    image_emb = embed_image_files(clip, [f.path for f in files], batch_size)
    text_emb = embed_prompts(clip, prompts, batch_size)
    cos = cosine_per_image(image_emb, text_emb, index)
    group_means(cos, index, len(prompts))
    return {f.name: float(s) for f, s in zip(files, cos)}


def tiny_clip_config(folder: Path) -> str:
    """The tests' 1-layer CLIP (tests/pipes.py) as an open_clip JSON config, for --smoke."""
    import json
    from pipes import TINY_CLIP
    (folder / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    return str(folder / "tiny-clip.json")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip-model", default="ViT-B-32")
    ap.add_argument("--clip-pretrained", default=None, help="weights file (default: random initialisation)")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--crops", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    if args.smoke:  # tests/test_benchmarks.py; options given on the command line still win
        ap.set_defaults(clip_model=tiny_clip_config(Path(tempfile.mkdtemp())), prompts=2, crops=2, size=32, batch_size=4)
        args = ap.parse_args()
    clip = (load_clip(args.clip_model, args.clip_pretrained, torch.device("cpu")) if args.clip_pretrained
            else random_clip(args.clip_model))
    n = args.prompts * args.crops
    print(f"{clip.name} ({clip.weights} weights), {n} images {args.size}x{args.size}, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_crops(folder, args.prompts, args.crops, args.size)
        with torch.no_grad():  # warm-up: allocator and kernel caches
            size = clip.model.visual.image_size
            clip.model.encode_image(torch.zeros(2, 3, *(size if isinstance(size, tuple) else (size, size))))
        times = {"one at a time": [], "batched": []}
        for _ in range(args.repeats):
            for label, fn in (("one at a time", lambda: one_at_a_time(clip, folder)),
                              ("batched", lambda: batched(clip, folder, args.batch_size))):
                t = time.perf_counter()
                result = fn()
                times[label].append(time.perf_counter() - t)
                if label == "one at a time":
                    ref = result
                else:
                    diff = max(abs(result[k] - ref[k]) for k in ref)
                    assert result.keys() == ref.keys() and diff < 1e-5, f"scores differ by {diff}"
    rates = {k: n / statistics.median(v) for k, v in times.items()}
    for k, r in rates.items():
        print(f"{k:14s} {r:8.2f} images/s")
    print(f"max |score difference| {diff:.2e}; batched / one at a time: {rates['batched'] / rates['one at a time']:.2f}x")


if __name__ == "__main__":
    main()
