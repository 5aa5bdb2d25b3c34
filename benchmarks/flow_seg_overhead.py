"""SEG on joint attention: cost ratios measured in one run (medians of --repeats), on the tiny SD3 and Flux
pipelines of the tests (tests/pipes.py), and peak memory with and without --offload.

    OMP_NUM_THREADS=1 python benchmarks/flow_seg_overhead.py [--size 32] [--n 2] [--repeats 5] [--device cpu]

1. one denoiser step of SEG + CFG / one step of CFG (SEG on every block, a finite gaussian blur): the perturbed
   pass rides in the same batch (3 chunks instead of 2), aim <= 1.5; "batch floor" runs the 3 chunks with
   sigma 0 (the processors installed, nothing blurred): the cost of the extra chunk alone;
2. peak memory of one CFG step loaded plainly / with --offload (diffusers' model CPU offload). On CUDA this is
   torch.cuda.max_memory_allocated; on a CPU there is nothing to offload (diffcli loads the pipeline as usual) and
   the figure is the process's peak resident memory (ru_maxrss), which only grows: the two rows then say the
   same thing and are printed for the layout, not as a result.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
from diffcli.backends import pipelines  # noqa: E402
from diffcli.core import attention  # noqa: E402
from diffcli.core.guidance import classifier_free, smoothed_energy  # noqa: E402
from diffcli.core.query_blur import parse_blur  # noqa: E402
from diffcli.shared.devices import PerSampleRandn  # noqa: E402
from seg_overhead import interleaved  # noqa: E402  (the one interleaved timer)


def step_ratios(path: Path, args, device) -> dict[str, float]:
    fam = pipelines.load_family(str(path), device, torch.float32)
    fam.check_size(args.size, args.size)
    cond, uncond = fam.encode_prompts(["a cat"] * args.n, None, args.size, args.size, device)
    sigmas = fam.sigmas(4, device)
    x = fam.initial_latents(PerSampleRandn(range(args.n), device), fam.latent_shape(args.size, args.size), sigmas[1])
    sigma = sigmas[1].expand(args.n)
    state = attention.SegState()
    every = fam.layers(["all"])
    blur, zero = parse_blur("gaussian_-1_2"), parse_blur("gaussian_-1_0")
    cfg = classifier_free(fam.denoiser(), 5.0, cond, uncond)
    seg = smoothed_energy(fam.denoiser(), 3.0, 5.0, cond, uncond, state, lambda s: blur)
    floor = smoothed_energy(fam.denoiser(), 3.0, 5.0, cond, uncond, state, lambda s: zero)
    with torch.no_grad(), attention.installed(fam.attention, state, every):
        t = interleaved({"cfg": lambda: cfg(x, sigma), "seg": lambda: seg(x, sigma),
                         "floor": lambda: floor(x, sigma)}, args.repeats)
    return {"seg/cfg": t["seg"] / t["cfg"], "floor/cfg": t["floor"] / t["cfg"]}


def peak_memory(path: Path, args, device, offload: bool) -> float:
    """MiB at the peak of loading and one CFG step (see the module docstring for what it means on a CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    fam = pipelines.load_family(str(path), device, torch.float32, offload=offload)
    fam.check_size(args.size, args.size)
    cond, uncond = fam.encode_prompts(["a cat"] * args.n, None, args.size, args.size, device)
    sigmas = fam.sigmas(2, device)
    x = fam.initial_latents(PerSampleRandn(range(args.n), device), fam.latent_shape(args.size, args.size), sigmas[0])
    with torch.no_grad():
        classifier_free(fam.denoiser(), 5.0, cond, uncond)(x, sigmas[0].expand(args.n))
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (the test suite's check)")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.n, args.repeats = 16, 1, 1
    device = torch.device(args.device)
    from pipes import build_tiny_flux, build_tiny_sd3
    root = Path(tempfile.mkdtemp())
    models = {"sd3": build_tiny_sd3(root / "sd3"), "flux": build_tiny_flux(root / "flux")}
    print(f"device {device}, {args.size} px, n {args.n}, medians of {args.repeats}")
    for name, path in models.items():
        r = step_ratios(path, args, device)
        print(f"{name:5s} SEG+CFG step / CFG step: {r['seg/cfg']:.2f}   batch floor (3 chunks, nothing blurred) / "
              f"CFG: {r['floor/cfg']:.2f}")
    for name, path in models.items():
        plain, off = peak_memory(path, args, device, False), peak_memory(path, args, device, True)
        what = "CUDA max allocated" if device.type == "cuda" else "process peak RSS (CPU: nothing to offload)"
        print(f"{name:5s} peak memory ({what}): plain {plain:.1f} MiB, --offload {off:.1f} MiB, "
              f"ratio {off / plain:.2f}")


if __name__ == "__main__":
    main()
