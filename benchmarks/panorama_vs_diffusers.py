"""diffcli panorama against diffusers' StableDiffusionPanoramaPipeline, and the memory of the tiled decode.

    python benchmarks/panorama_vs_diffusers.py [--steps 5] [--windows 41] [--repeats 3]

Part 1, speed: a random SD (bigger than the test one) built in code, the same model, canvas, steps, prompt, CFG,
noise and the SAME 41 windows (window 16 latent cells, stride 2, as 003's 64/8 on a 64x384 latent), timed in one
run: diffusers' loop with its default view_batch_size=1 and with 8, ours with --view-batch 1 and 8. Their final
latents are compared too (deterministic DDIM makes MultiDiffusion's x_t averaging and our x0 averaging the same
map). Sampling loop and decode are timed apart: diffusers decodes the whole canvas at once, we decode 003's
overlapping tiles (stride = window stride) and average them.

Part 2, memory: peak resident memory added by decoding a latent canvas 16 cells high and 96..768 wide, with the
whole-canvas decode diffusers uses and with our tiled decode (4 tiles a batch), each in a fresh process.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from diffcli.backends import pipelines  # noqa: E402
from diffcli.shared.devices import PerSampleRandn  # noqa: E402
from diffcli.core.denoisers import ve_to_vp  # noqa: E402
from diffcli.panorama import PanoramaConfig, decode_tiled, generate, plan, validate  # noqa: E402
from diffcli.core.views import windows  # noqa: E402

PROMPT = "a beach at sunrise"


def build_sd(root: Path) -> Path:
    """SD-shaped, random: UNet (32, 64) channels, 16-cell latent window, tiny VAE (factor 2)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    from pipes import tiny_scheduler, tiny_text_config, tiny_tokenizer, tiny_vae
    tokenizer, vocab = tiny_tokenizer(root / "tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(tiny_text_config(vocab, hidden=32)),
                                   tokenizer=tokenizer, unet=unet, scheduler=tiny_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median wall time of each function, the functions taking turns (a shared machine's load drifts)."""
    times: dict = {k: [] for k in fns}
    outs: dict = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def speed(args) -> None:
    import tempfile
    from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline
    dev = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        pipe = pipelines.load_pipeline(str(build_sd(Path(tmp))), dev, torch.float32)
    f, win, stride = 2, 16, 2
    width = (win + stride * (args.windows - 1)) * f
    cfg = PanoramaConfig(prompt=PROMPT, height=win * f, width=width, stride=stride, steps=args.steps, seed=1)
    p = plan(pipe, cfg, validate(cfg))
    theirs = StableDiffusionPanoramaPipeline(**{**pipe.components,
                                                "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
    theirs.set_progress_bar_config(disable=True)
    # same windows (its own get_views assumes a VAE factor of 8 and would drop a border window)
    theirs.get_views = lambda *a, **k: [(w.top, w.top + w.height, w.left, w.left + w.width) for w in p.views.views]
    start = PerSampleRandn([1]).randn(p.latent)

    def diffusers_loop(vb, steps=args.steps):
        return theirs(PROMPT, height=cfg.height, width=width, num_inference_steps=steps, guidance_scale=7.5,
                      latents=start.clone(), view_batch_size=vb, output_type="latent").images

    def ours_loop(vb, steps=args.steps):
        # generate() = loop + tiled decode; time the loop alone by swapping the decode out
        import diffcli.panorama as pano
        keep = pano.decode_tiled
        pano.decode_tiled = lambda *a, **k: None
        try:
            return generate(pipe, p, PROMPT, PanoramaConfig(**{**cfg.__dict__, "view_batch": vb, "steps": steps}),
                            dev)[1]
        finally:
            pano.decode_tiled = keep

    for vb in (1, 8):  # warm-up: one step of each, so no variant pays first-call costs
        diffusers_loop(vb, 1), ours_loop(vb, 1)

    sigma_last = pipelines.sigmas(pipe, args.steps, dev)[-1]
    print(f"torch threads {torch.get_num_threads()}; latent {tuple(p.latent)}, {len(p.views)} windows of {win}, "
          f"stride {stride}, {args.steps} DDIM steps, CFG 7.5; median of {args.repeats}, variants taking turns")
    t, outs = interleaved({("diffusers", 1): lambda: diffusers_loop(1), ("ours", 1): lambda: ours_loop(1),
                           ("diffusers", 8): lambda: diffusers_loop(8), ("ours", 8): lambda: ours_loop(8)},
                          args.repeats)
    for vb in (1, 8):
        diff = (ve_to_vp(outs["ours", vb], sigma_last) - outs["diffusers", vb][0]).abs().max().item()
        print(f"  view batch {vb}: diffusers loop {t['diffusers', vb]:.2f} s, ours {t['ours', vb]:.2f} s "
              f"(ratio {t['ours', vb] / t['diffusers', vb]:.2f}); max |latent difference| {diff:.1e}")
    z = outs["ours", 8]
    d, _ = interleaved({"full": lambda: pipelines.decode(pipe, z[None], sigma_last),
                        "tiles": lambda: decode_tiled(pipe, z, sigma_last, p.tiles, 4)}, max(3, args.repeats))
    t_full, t_tiles = d["full"], d["tiles"]
    print(f"  decode: whole canvas (diffusers) {t_full:.3f} s, {len(p.tiles)} overlapping tiles (ours) {t_tiles:.3f} s")
    base = t["diffusers", 1] + t_full
    print(f"ratio ours (view batch 8, tiled decode) / diffusers (its default view batch 1): "
          f"{(t['ours', 8] + t_tiles) / base:.2f} end to end, {t['ours', 8] / t['diffusers', 1]:.2f} sampling loop")
    print(f"ratio at equal view batch 8: {(t['ours', 8] + t_tiles) / (t['diffusers', 8] + t_full):.2f} end to end, "
          f"{t['ours', 8] / t['diffusers', 8]:.2f} sampling loop")


def _decode_peak(width: int, tiled: bool, queue) -> None:
    """In a fresh process: peak RSS added by one decode of a (4, 16, width) latent canvas, in MiB."""
    import resource
    torch.set_num_threads(1)
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3).eval()
    from diffcli.backends.stable_diffusion import StableDiffusion
    pipe = StableDiffusion(SimpleNamespace(vae=vae, vae_scale_factor=4))  # the SD family around a bare VAE
    z = torch.randn(4, 16, width)
    tiles = windows(16, width, (16, 16), 2)
    with torch.no_grad():  # warm the allocator on one tile so both variants start from the same baseline
        pipelines.decode(pipe, z[None, :, :, :16], 0.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if tiled:
        decode_tiled(pipe, z, 0.0, tiles, 4)
    else:
        pipelines.decode(pipe, z[None], 0.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(((peak - before) / 1024, time.perf_counter() - t))


def memory(args) -> None:
    ctx = mp.get_context("spawn")
    print("decode memory: extra peak RSS (MiB) for a latent canvas 16 cells high (64 px), VAE (32, 64, 64)")
    print(f"{'latent width':>12s} {'px':>6s} {'whole canvas':>13s} {'tiled (ours)':>13s}")
    for width in args.widths:
        row = []
        for tiled in (False, True):
            q = ctx.Queue()
            proc = ctx.Process(target=_decode_peak, args=(width, tiled, q))
            proc.start()
            proc.join()  # the answer is two floats: the queue never fills
            if proc.exitcode != 0 or q.empty():
                raise SystemExit(f"decode-memory child (width {width}, tiled {tiled}) failed (exit {proc.exitcode})")
            mib, _ = q.get()
            row.append(mib)
        print(f"{width:12d} {width * 4:6d} {row[0]:13.0f} {row[1]:13.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--windows", type=int, default=41)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--widths", type=int, nargs="+", default=[96, 192, 384, 768])
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: only checks that the script runs")
    args = ap.parse_args()
    if args.smoke:  # tests/test_benchmarks.py; options given on the command line still win
        ap.set_defaults(steps=1, windows=3, repeats=1, widths=[16])
        args = ap.parse_args()
    speed(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
