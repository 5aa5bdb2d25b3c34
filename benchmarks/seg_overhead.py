"""SEG costs, as ratios measured in one run (medians of --repeats):

    OMP_NUM_THREADS=1 python benchmarks/seg_overhead.py [--size 64] [--steps 10] [--n 2] [--grid 64]

1. step time of SEG + CFG / CFG on the tiny SD pipeline of the tests (tests/pipes.py) at --size px: the perturbed
   pass rides in the same batch (3 chunks instead of 2), so the aim is <= 1.5; the "batch floor" row runs the
   3 chunks with no layer blurred, the cost of the extra chunk alone;
2. a run with --regions begin / a full SEG run (outside the regions only the CFG passes run);
3. box blur at K = grid size / K = 3 on a (2, 10, grid^2, 64) query (integral image: aim <= 1.2);
4. gaussian at large sigma (kernel capped to the grid) / the infinite-blur path, for the blur alone and for a
   whole attention layer (the infinite path attends with one query row).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from diffcli.core import attention  # noqa: E402
from diffcli.backends import pipelines  # noqa: E402
from diffcli.core.query_blur import box_blur, parse_blur  # noqa: E402
from diffcli.shared.devices import PerSampleRandn  # noqa: E402
from diffcli.core.guidance import REGIONS, blur_schedule, guided_steps, smoothed_energy  # noqa: E402
from diffcli.core.samplers import sample_euler  # noqa: E402

CPU = torch.device("cpu")


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median time of each function, taking turns so that a busy machine slows all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def pipeline_ratios(args) -> list[tuple[str, float, float, str]]:
    from pipes import build_tiny_sd
    pipe = pipelines.load_pipeline(str(build_tiny_sd(Path(tempfile.mkdtemp()))), CPU, torch.float32)
    cond, uncond = pipelines.encode_prompts(pipe, ["a cat"] * args.n, None, args.size, args.size, CPU)
    sigmas = pipelines.sigmas(pipe, args.steps, CPU)
    x = pipelines.initial_latents(PerSampleRandn(range(args.n)), pipelines.latent_shape(pipe, args.size, args.size),
                                  sigmas[0])
    state = attention.SegState()

    def run(seg_scale: float, blur: str, layers: list[str], regions=REGIONS):
        blur_at = blur_schedule(parse_blur(blur), sigmas, guided_steps(sigmas, list(regions)))
        model = smoothed_energy(pipelines.denoiser(pipe), seg_scale, 5.0, cond, uncond, state, blur_at)

        def go():
            with attention.installed(pipe.unet, state, attention.resolve_layers(pipe.unet, layers) if layers else []):
                sample_euler(model, x, sigmas)
        return go

    t = interleaved({
        "cfg": run(0.0, "gaussian_-1_1e7", ["mid"]),
        "floor": run(3.0, "gaussian_-1_1e7", []),  # no processor: the 3rd chunk runs, nothing is blurred
        "inf": run(3.0, "gaussian_-1_1e7", ["mid"]),
        "gauss": run(3.0, "gaussian_-1_2", ["mid"]),
        "all": run(3.0, "gaussian_-1_2", ["down", "mid", "up"]),
        "begin": run(3.0, "gaussian_-1_1e7", ["mid"], ["begin"]),
    }, args.repeats)
    t = {k: v / args.steps for k, v in t.items()}
    where = f"tiny SD, {args.size} px, batch {args.n}, {args.steps} steps"
    return [("3 chunks, none blurred / CFG step (batch floor)", t["floor"], t["cfg"], where),
            ("SEG+CFG / CFG step, mid, infinite blur", t["inf"], t["cfg"], where),
            ("SEG+CFG / CFG step, mid, gaussian_-1_2", t["gauss"], t["cfg"], where),
            ("SEG+CFG / CFG step, down+mid+up, gaussian_-1_2", t["all"], t["cfg"], where),
            ("--regions begin / full SEG run, mid, infinite", t["begin"], t["inf"], where)]


def blur_ratios(args) -> list[tuple[str, float, float, str]]:
    g = args.grid
    q = torch.randn(2, 10, g * g, 64)
    large, inf = parse_blur("gaussian_-1_5000"), parse_blur("gaussian_-1_1e7")
    t = interleaved({"box_g": lambda: box_blur(q, g, g, g), "box_3": lambda: box_blur(q, g, g, 3),
                     "large": lambda: large(q, g, g), "inf": lambda: inf(q, g, g)}, args.repeats)
    rows = [(f"box blur K={g} / K=3", t["box_g"], t["box_3"], f"query (2, 10, {g}x{g}, 64)"),
            ("gaussian S=5000 / infinite, blur alone", t["large"], t["inf"], f"query (2, 10, {g}x{g}, 64)")]

    from diffusers.models.attention_processor import Attention
    layer = Attention(query_dim=640, heads=10, dim_head=64).eval()
    x = torch.randn(3, g * g, 640)  # uncond, cond, seg chunks of one image

    def attend(spec: str):
        state = attention.SegState(roles=("uncond", "cond", "seg"), blur=parse_blur(spec), latent_hw=(g, g))
        proc = attention.SegAttnProcessor(state, "attn1", True)
        return torch.no_grad()(lambda: proc(layer, x))

    t = interleaved({"large": attend("gaussian_-1_5000"), "inf": attend("gaussian_-1_1e7")}, args.repeats)
    rows.append(("gaussian S=5000 / infinite, whole attention layer", t["large"], t["inf"],
                 f"640 ch, 10 heads, {g}x{g} tokens, 3 chunks"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=64, help="image side in px (tiny VAE: latent = size / 2)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--grid", type=int, default=64, help="token grid side for the blur benchmarks")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    if args.smoke:  # tests/test_benchmarks.py; options given on the command line still win
        ap.set_defaults(size=16, steps=2, n=1, grid=8, repeats=1)
        args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"{'ratio':50s} {'a (ms)':>9s} {'b (ms)':>9s} {'a/b':>6s}  setting")
    for name, a, b, where in pipeline_ratios(args) + blur_ratios(args):
        print(f"{name:50s} {a * 1e3:9.2f} {b * 1e3:9.2f} {a / b:6.2f}  {where}")


if __name__ == "__main__":
    main()
