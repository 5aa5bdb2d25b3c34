"""Typer app: parse options, call one function per command, map errors to exit codes."""
from __future__ import annotations

import functools
import importlib
import inspect
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from .shared.errors import DiffcliError
from .anagram import AnagramConfig
from .eval import EvalConfig
from .core.query_blur import SPEC_FORMS
from .core.samplers import SAMPLERS
from .core.views import VIEWS
from .options import GuidanceOptions, SamplingOptions, default, defaults, group_fields
from .panorama import PanoramaConfig
from .pg import PGConfig
from .sample import SampleConfig
from .seg import SegConfig
from .train import TrainConfig

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="diffcli: train, sample and guide diffusion models.\n\n"
                       "Example: diffcli sample --labels all --n 20 --out digits")

_state = {"debug": False}

# ---------------------------------------------------------------- the options every generating command shares

# field of options.GuidanceOptions / SamplingOptions -> (flags, type, help); defaults come from each command's config
SHARED: dict[str, tuple[tuple[str, ...], Any, str]] = {
    "cfg": (("--cfg", "--guidance"), Optional[float],
            "CFG scale w: D_u + w (D_c - D_u); 1 = conditional only, 0 = unconditional (with SEG on, 0 or 1 = SEG "
            "without CFG, as the official SEG code). Same as the 002 seed's alpha."),
    "seg_scale": (("--seg-scale",), Optional[float],
                  "SEG: s in D_c + s (D_c - D_seg); 0 = off (default: 3 when --blur is given, else off)."),
    "blurs": (("--blur",), Optional[List[str]],
              f"SEG query blur: {SPEC_FORMS}. Turns SEG on (default infinite blur)."),
    "layers": (("--layers",), List[str],
               "SEG: self-attention layers to perturb: down, mid, up, or indexed d4, m0, u1 (repeatable or "
               "comma-separated)."),
    "regions": (("--regions",), List[str], "SEG: thirds of the steps that run the perturbed pass (begin = noisiest)."),
    "sigma_start": (("--sigma-start",), float, "SEG: perturb only at noise levels sigma <= this."),
    "sigma_end": (("--sigma-end",), float, "SEG: perturb only at noise levels sigma >= this."),
    "pg_factor": (("--pg-factor",), float,
                  "PG: lambda in dx/dsigma = (x - D)/sigma + lambda sigma grad_x sum_j k(x_i, x_j) over the batch; "
                  "> 0 repels, 0 = off."),
    "kernel": (("--kernel",), str, "PG kernel, an RBF on: rbf the sample x itself (pixels, or a pipeline's latent); "
                                   "x0 the denoiser's x0_hat; classifier the digit classifier's 128-d features of "
                                   "x0_hat (digit models); clip CLIP image features of the decoded x0_hat (pipelines). "
                                   "posterior: the chance two particles share a class, from the model's own "
                                   "class-conditional denoisers (class-conditional digit models, unconditional "
                                   "sampling; every class a pass inside the PG sigma window). centroid: where the "
                                   "ink of x0_hat is (next-frame models: the digit's position)."),
    "pg_grad": (("--pg-grad",), str, "PG kernels on x0_hat (x0, classifier, clip): exact = the gradient through the "
                                     "network (one backward pass a step), skip = EDM's c_skip(sigma) I (no backward "
                                     "pass, nearly nothing at high sigma)."),
    "pg_bandwidth": (("--pg-bandwidth",), float, "PG: kernel bandwidth as a multiple of the median heuristic "
                                                 "(< 1: only near neighbours repel)."),
    "pg_sigma_min": (("--pg-sigma-min",), float, "PG acts only at noise levels sigma >= this."),
    "pg_sigma_max": (("--pg-sigma-max",), float, "PG acts only at noise levels sigma <= this."),
    "s_churn": (("--s-churn",), float, "stochastic_heun: EDM S_churn."),
    "s_tmin": (("--s-tmin",), float, "stochastic_heun: EDM S_tmin."),
    "s_tmax": (("--s-tmax",), float, "stochastic_heun: EDM S_tmax."),
    "s_noise": (("--s-noise",), float, "stochastic_heun, euler_ancestral: noise scale S_noise."),
    "eta": (("--eta",), Optional[float], "ddim: 0 deterministic (default), 1 ancestral; euler_ancestral: default 1."),
    "sampler": (("--sampler",), Optional[str],
                f"{', '.join(SAMPLERS)} (dpmpp_2m: DPM-Solver++(2M)). On a pipeline's own sigmas euler is DDIM."),
    "steps": (("--steps",), Optional[int], "Sampling steps (heun: 2*steps-1 network evaluations)."),
    "schedule": (("--schedule",), Optional[str],
                 "Pipelines: the noise levels: scheduler (its own timesteps, default) or karras (in its sigma range)."),
    "rho": (("--rho",), float, "Karras schedule exponent."),
}


def shared_options(config: type, *groups: type) -> Callable:
    """Add one CLI option per field of the option groups to a command, with the command config's defaults; the
    command receives them as one dict `shared`, which it passes to its config unchanged."""
    names = group_fields(*groups)
    values = defaults(config, names)

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=SHARED[n][1],
                                   default=typer.Option(values[n], *SHARED[n][0], help=SHARED[n][2])) for n in names]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, shared={n: kwargs.pop(n) for n in names}, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "shared"]
                                            + extra)
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
        return wrapper

    return deco


def read_config(ctx: typer.Context, param: Any, value: Optional[Path]) -> Optional[Path]:
    """`--config FILE`: a TOML file whose keys are the command's options (seg_scale or seg-scale, blur, cfg, ...);
    they become the options' defaults, so flags given on the command line win."""
    if value is None:
        return None
    from .shared.configfile import read_options
    try:
        values = read_options(value, {p.name: [o.lstrip("-") for o in p.opts] for p in ctx.command.params
                                      if p.name not in ("config", "ctx")})
    except DiffcliError as e:
        raise typer.BadParameter(str(e), ctx=ctx, param=param) from None
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def with_config(fn: Callable) -> Callable:
    """Add `--config FILE` to a command (read first, as the defaults of every other option)."""
    sig = inspect.signature(fn, eval_str=True)
    option = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                               default=typer.Option(None, "--config", is_eager=True, callback=read_config,
                                                    metavar="FILE.toml", help="Options from a TOML file (the same "
                                                    "names as the flags); flags given here win."))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("config", None)
        return fn(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), option])
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
    return wrapper


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable) -> Callable:
    """One line on stderr and a non-zero exit for every expected failure; a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except DiffcliError as e:
            if _state.get("reraise"):  # a sweep checking its settings words the message itself
                raise
            if _state["debug"]:
                traceback.print_exc()
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        except MemoryError:
            _fail("out of memory; try a smaller --batch-size or image size", 1)
        except OSError as e:
            if _state["debug"]:
                traceback.print_exc()
            _fail(f"{e.strerror or e}{': ' + str(e.filename) if getattr(e, 'filename', None) else ''}", 1)
        except Exception as e:  # a bug: still one line unless --debug
            if _state["debug"]:
                raise
            _fail(f"internal error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                  "rerun with --debug for the traceback", 1)

    return wrapper


# ---------------------------------------------------------------- train

@app.command()
@handle_errors
@with_config
def train(
    out: Path = typer.Option(Path("runs/edm"), "--out", help="Run folder: checkpoints, grids, log, run.json."),
    dataset: str = typer.Option(default(TrainConfig, "dataset"), help="mnist, fashion-mnist, cifar10, folder:PATH, or a next-frame sequence set made from the MNIST digits under --data-root: moving-mnist, circle-jumping, horizontal."),
    data_root: str = typer.Option(default(TrainConfig, "data_root"), help="Where torchvision-layout datasets live (or are downloaded to)."),
    split: str = typer.Option(default(TrainConfig, "split"), help="train or test split of the dataset."),
    image_size: Optional[int] = typer.Option(None, help="Resize images to this size (default: native); for sequence sets the frame size (default 32; digits are half of it)."),
    channels: Optional[int] = typer.Option(None, help="1 or 3 for folder datasets (default: from the files)."),
    unconditional: bool = typer.Option(False, "--unconditional", help="Ignore labels."),
    p_uncond: float = typer.Option(default(TrainConfig, "p_uncond"), help="Label dropout probability (one model does CFG)."),
    process: str = typer.Option(default(TrainConfig, "process"), help="edm (Karras et al. 2022) or blurring (Hoogeboom & Salimans 2023: DCT heat dissipation under cosine noise, eps-prediction)."),
    blur_sigma_max: Optional[float] = typer.Option(None, "--blur-sigma-max", help="blurring: largest blur std in pixels, sigma_B,max (default 20; 0 = plain DDPM-style diffusion)."),
    p_mean: Optional[float] = typer.Option(None, "--p-mean", help=f"edm: mean of ln(sigma) drawn in training (default {default(TrainConfig, 'p_mean')}; higher = more training at high noise, where a digit's class is decided)."),
    p_std: Optional[float] = typer.Option(None, "--p-std", help=f"edm: standard deviation of ln(sigma) drawn in training (default {default(TrainConfig, 'p_std')})."),
    net: str = typer.Option(default(TrainConfig, "net"), help="Architecture preset: small, tiny, base."),
    channels_mult: Optional[str] = typer.Option(None, "--block-channels", help="Override block widths, e.g. 32,64,96."),
    steps: int = typer.Option(default(TrainConfig, "steps"), help="Total optimizer steps (a resumed run may raise it)."),
    batch: int = typer.Option(default(TrainConfig, "batch"), help="Global batch size (split across torchrun processes)."),
    lr: float = typer.Option(default(TrainConfig, "lr"), help="Adam learning rate."),
    lr_warmup: int = typer.Option(default(TrainConfig, "lr_warmup"), help="Linear warm-up steps."),
    ema_halflife_kimg: float = typer.Option(default(TrainConfig, "ema_halflife_kimg"), help="EMA half-life in thousands of images."),
    seed: int = typer.Option(default(TrainConfig, "seed")),
    ckpt_every: int = typer.Option(default(TrainConfig, "ckpt_every"), help="Checkpoint every N steps (0: only at the end)."),
    snapshot_every: int = typer.Option(default(TrainConfig, "snapshot_every"), "--snapshot-every", help="Also keep the EMA model of every N-th step as snapshots/step-NNNNNNN.safetensors (0: none); sample, pg and sweep read one as --checkpoint RUN@STEP."),
    grid_every: int = typer.Option(default(TrainConfig, "grid_every"), help="Sample grid every N steps (0: never)."),
    log_every: int = typer.Option(default(TrainConfig, "log_every"), help="Loss log line every N steps."),
    precision: Optional[str] = typer.Option(None, help="fp32 (default) or bf16 autocast; on --resume, changes the run's."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N, mps."),
    quiet: bool = typer.Option(False, "--quiet"),
    context_frames: Optional[int] = typer.Option(None, "--context-frames", help="Sequence sets: frames the model sees before the one it predicts (default 2)."),
    step_size: Optional[int] = typer.Option(None, "--step-size", help="Sequence sets: pixels the digit moves a frame (default 4; moving-mnist: the largest velocity component)."),
    directions: Optional[int] = typer.Option(None, "--directions", help="circle-jumping: K equally likely jump directions on the circle (default 4)."),
    p_left: Optional[float] = typer.Option(None, "--p-left", help="horizontal: probability that the digit moves left (default 0.5)."),
    p_change: Optional[float] = typer.Option(None, "--p-change", help="moving-mnist: probability that the velocity is redrawn before each move (default 0: constant velocity)."),
    num_digits: Optional[int] = typer.Option(None, "--num-digits", help="moving-mnist: 1 (default) or 2 digits moving independently."),
    data_seed: Optional[int] = typer.Option(None, "--data-seed", help="Sequence sets: seed of the generated motions (default 0)."),
    preview: int = typer.Option(0, "--preview", help="Write OUT/preview.png with this many example sequences (context | next frame | every allowed future) and exit without training."),
) -> None:
    """Train a model: EDM (class-conditional with label dropout, unconditional, or next-frame) or blurring diffusion.

    Example: diffcli train --dataset mnist --data-root data --steps 8000 --out runs/mnist

    Blurring diffusion: diffcli train --process blurring --blur-sigma-max 20 --out runs/blur

    Example: diffcli train --dataset circle-jumping --data-root data --split test --directions 4 --preview 8 --out preview
    """
    from .train import TrainConfig, train as run_train
    overrides = {}
    if channels_mult:
        try:
            overrides["block_out_channels"] = [int(c) for c in channels_mult.split(",")]
        except ValueError:
            raise DiffcliError(f"--block-channels expects comma-separated integers, got {channels_mult!r}") from None
    cfg = TrainConfig(dataset=dataset, data_root=data_root, split=split, image_size=image_size, channels=channels,
                      conditional=not unconditional, p_uncond=p_uncond, net=net, net_overrides=overrides,
                      steps=steps, batch=batch, lr=lr, lr_warmup=lr_warmup, ema_halflife_kimg=ema_halflife_kimg,
                      seed=seed, ckpt_every=ckpt_every, snapshot_every=snapshot_every, grid_every=grid_every, log_every=log_every, process=process,
                      blur_sigma_max=20.0 if blur_sigma_max is None else blur_sigma_max,
                      p_mean=default(TrainConfig, "p_mean") if p_mean is None else p_mean,
                      p_std=default(TrainConfig, "p_std") if p_std is None else p_std)
    if blur_sigma_max is not None and process != "blurring":
        raise DiffcliError("--blur-sigma-max is a --process blurring option")
    if (p_mean is not None or p_std is not None) and process != "edm":
        raise DiffcliError("--p-mean and --p-std are --process edm options")
    given = {"context_frames": context_frames, "step_size": step_size, "directions": directions, "p_left": p_left,
             "seed": data_seed, "p_change": p_change, "num_digits": num_digits}
    cfg.sequence = {k: v for k, v in given.items() if v is not None}
    if preview:
        from .train import write_preview
        typer.echo(f"wrote {write_preview(cfg, out, preview, overwrite)}")
        return
    result = run_train(cfg, out, resume=resume, overwrite=overwrite, device_name=device, quiet=quiet,
                       options={"out": str(out), "resume": resume, "device": device}, precision=precision)
    if not quiet:
        typer.echo(f"trained to step {result['step']} (loss {result['loss']:.4f}); model: {Path(result['out']) / 'model.safetensors'}")


# ---------------------------------------------------------------- sample

@app.command()
@handle_errors
@with_config
@shared_options(SampleConfig, GuidanceOptions, SamplingOptions)
def sample(
    checkpoint: Optional[Path] = typer.Option(None, help="A diffcli model file, a run folder (its latest model), or RUN@STEP (a snapshot of --snapshot-every); default: the shipped MNIST model."),
    n: int = typer.Option(default(SampleConfig, "n"), "--n", help="Number of samples."),
    labels: Optional[str] = typer.Option(None, help="Class of each sample, cycled: '0,3,7' or 'all' (default: all)."),
    sigma_min: Optional[float] = typer.Option(None, help="Lowest noise level (default: the model's, 0.002)."),
    sigma_max: Optional[float] = typer.Option(None, help="Highest noise level (default: the model's, 80)."),
    seed: int = typer.Option(default(SampleConfig, "seed"), help="Sample i uses seed + i, whatever the batch size."),
    batch_size: int = typer.Option(default(SampleConfig, "batch_size"), help="Samples per network batch."),
    dtype: Optional[str] = typer.Option(None, help="Network precision: fp32 (default), fp16 or bf16 (GPU)."),
    strip: bool = typer.Option(default(SampleConfig, "strip"), "--strip", help="Also write strip.png: x0_hat along the steps (blurring models: z_t at t = 1, 0.9, ..., 0)."),
    gif: bool = typer.Option(default(SampleConfig, "gif"), "--gif", help="Also write process.gif: the first 8 samples at every step (blurring models: the blur undone); with --show-forward, forward.gif."),
    clip_denoised: bool = typer.Option(default(SampleConfig, "clip_denoised"), "--clip-denoised", help="Plain (blur_sigma_max 0) blurring-process models: keep x0_hat in [-1, 1] at every step (DDPM's clip_denoised; refused for blurring models, where x0_hat is ill-conditioned)."),
    show_forward: Optional[Path] = typer.Option(None, "--show-forward", metavar="IMAGE", help="Instead of sampling, picture the blurring forward process on IMAGE: forward.png (blurred | blurred + noise, t = 0 .. 1)."),
    blur_sigma_max: Optional[float] = typer.Option(None, "--blur-sigma-max", help="With --show-forward: sigma_B,max (default: the --checkpoint's blurring model's, else 20)."),
    nrow: Optional[int] = typer.Option(None, help="Images per grid row."),
    out: Path = typer.Option(Path("diffcli-out/sample"), "--out", help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty output folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out: same options, samples already written are skipped."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N, mps."),
    context: Optional[str] = typer.Option(None, "--context", help="Next-frame models: the frames to continue, as an index into the model's sequence dataset (truth known: metrics) or a file (a PNG of the frames side by side, or a .pt/.safetensors tensor). All n samples share it."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="With --context N: where the model's MNIST digits are (default: the digits its model file carries, else the folder recorded at training)."),
    shared: dict = None,
) -> None:
    """Sample a diffcli model (EDM or blurring diffusion): PNGs, a grid, run.json, optionally the denoising strip/GIF.

    Example: diffcli sample --labels all --n 20 --cfg 2 --strip --out digits

    Example: diffcli sample --checkpoint checkpoints/mnist-blurring.safetensors --strip --gif --out blur

    Example: diffcli sample --show-forward digit.png --blur-sigma-max 20 --gif --out forward

    Example: diffcli sample --checkpoint runs/circle --context 3 --n 8 --out next-frames

    Many GPUs: torchrun --nproc_per_node 4 -m diffcli -- sample --n 50000 --out fid-samples (each rank draws every 4th sample; the -- keeps torchrun off --n).
    """
    from .sample import SHIPPED_CHECKPOINT, SampleConfig, run as run_sample, show_forward as run_show_forward
    if show_forward is not None:
        result = run_show_forward(show_forward, out, overwrite, checkpoint, blur_sigma_max, seed, gif)
        typer.echo(f"wrote forward.png{', forward.gif' if gif else ''} (sigma_B,max {result['schedule']['blur_sigma_max']:g}) to {result['out']}")
        return
    if blur_sigma_max is not None:
        raise DiffcliError("--blur-sigma-max goes with --show-forward; a trained model's process is fixed")
    if checkpoint is None and not SHIPPED_CHECKPOINT.is_file():
        raise DiffcliError(f"the shipped model {SHIPPED_CHECKPOINT} is missing; pass --checkpoint")
    config = SampleConfig(**shared, checkpoint=str(checkpoint or SHIPPED_CHECKPOINT), n=n, labels=labels,
                          sigma_min=sigma_min, sigma_max=sigma_max, seed=seed, batch_size=batch_size, dtype=dtype,
                          strip=strip, gif=gif, clip_denoised=clip_denoised, nrow=nrow, context=context,
                          data_root=data_root)
    result = run_sample(config, out, overwrite, device, {"out": str(out), "device": device}, resume=resume)
    if result["main"]:
        skipped = f" ({result['skipped']} already there)" if resume else ""
        extra = "".join(f", {name}" for name, on in (("strip.png", strip), ("process.gif", gif)) if on)
        typer.echo(f"wrote {result['n']} samples{skipped}, grid.png{extra} and run.json to {result['out']}")


# ---------------------------------------------------------------- commands other issues fill in

@app.command()
@handle_errors
@with_config
@shared_options(SegConfig, GuidanceOptions, SamplingOptions)
def seg(
    prompt: Optional[str] = typer.Argument(None, help="Text prompt (or --prompts-file)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="One prompt a line (blank lines and # comments skipped)."),
    model: str = typer.Option(default(SegConfig, "model"), "--model", help="SD 1.x/2.x or SDXL pipeline: a hub id in the cache or a local folder (save_pretrained layout)."),
    seed: int = typer.Option(default(SegConfig, "seed"), help="Image i of each prompt uses seed + i."),
    n: int = typer.Option(default(SegConfig, "n"), "--n", help="Images per prompt (one batch)."),
    height: Optional[int] = typer.Option(None, help="Image height (default: the model's native size)."),
    width: Optional[int] = typer.Option(None, help="Image width (non-square allowed)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Prompt of the unconditional CFG branch (default: empty)."),
    metrics: bool = typer.Option(default(SegConfig, "metrics"), "--metrics", help="Write metrics.csv/json: per step, L2 of attention output - input, Laplacian variance, Sobel edge entropy of --track-block."),
    track_block: str = typer.Option(default(SegConfig, "track_block"), "--track-block", help="Block (down, mid, up) or layer (d4, m0, u1) whose metrics --metrics logs."),
    dtype: Optional[str] = typer.Option(None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, else fp32)."),
    out: Path = typer.Option(Path("diffcli-out/seg"), "--out", help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty output folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out (same options): prompts whose images all exist are skipped."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N, mps."),
    shared: dict = None,
) -> None:
    """Smoothed Energy Guidance (SEG) on Stable Diffusion 1.x/2.x and SDXL, with gaussian, box and EMA query blurs.

    Example: diffcli seg "a cat" --blur gaussian_-1_10 --blur interpolatedBoxBlur_5_0.5 --out seg-cats

    Example: diffcli seg --prompts-file prompts.txt --model ./sd-v1-5 --guidance 7.5 --regions begin --n 4
    """
    from .shared.names import read_prompts_file
    from .seg import SegConfig, run as run_seg
    if prompt is not None and prompts_file is not None:
        raise DiffcliError("give a prompt or --prompts-file, not both")
    prompts = read_prompts_file(prompts_file) if prompts_file is not None else ([prompt] if prompt is not None else [])
    config = SegConfig(**shared, prompts=prompts, model=model, seed=seed, n=n, height=height, width=width,
                       negative_prompt=negative_prompt, dtype=dtype, metrics=metrics, track_block=track_block)
    result = run_seg(config, out, overwrite, device, {"out": str(out), "device": device,
                                                      "prompts_file": str(prompts_file) if prompts_file else None},
                     resume=resume)
    if result["main"]:
        skipped = f" ({result['skipped']} prompt(s) already there)" if resume else ""
        typer.echo(f"wrote {result['images']} images ({result['blurs']} blur{'s' if result['blurs'] > 1 else ''})"
                   f"{skipped}, grid.png and run.json to {result['out']}")


@app.command()
@handle_errors
@with_config
@shared_options(PanoramaConfig, GuidanceOptions, SamplingOptions)
def panorama(
    prompt: Optional[str] = typer.Argument(None, help="Text prompt (or --prompts-file)."),
    prompts_file: Optional[str] = typer.Option(None, "--prompts-file", help="003 wide_image_prompts.json (prompt and eval_pos per entry), a text file (one prompt a line), or 'assignment' for the shipped 003 set (prompts/wide_image_prompts.json)."),
    model: str = typer.Option(default(PanoramaConfig, "model"), "--model", help="SD 1.x/2.x or SDXL pipeline: a local folder (save_pretrained layout) or a hub id in the cache."),
    height: int = typer.Option(default(PanoramaConfig, "height"), help="Image height in px (multiple of 8; taller than a window gives a tall image)."),
    width: int = typer.Option(default(PanoramaConfig, "width"), help="Image width in px (multiple of 8)."),
    window: Optional[int] = typer.Option(None, help="Window size in latent cells (default: the UNet's sample size, 64 = 512 px for SD 2 base)."),
    stride: int = typer.Option(default(PanoramaConfig, "stride"), help="Window stride in latent cells (8 = 64 px); the last window is flush with the border."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Prompt of the unconditional CFG branch (default: empty)."),
    seed: int = typer.Option(default(PanoramaConfig, "seed"), help="Seed of the canvas noise (003: 1; every prompt uses it)."),
    sync: str = typer.Option(default(PanoramaConfig, "sync"), help="What the windows agree on each step: x0 (SyncTweedies), eps, xt, or none (unsynchronized)."),
    noise: str = typer.Option(default(PanoramaConfig, "noise"), help="Initial noise: canvas (drawn on the canvas and cropped, 003) or views (one draw per window)."),
    view_batch: int = typer.Option(default(PanoramaConfig, "view_batch"), "--view-batch", help="Windows per network batch (x2 with CFG)."),
    decode_stride: Optional[int] = typer.Option(None, "--decode-stride", help="Latent cells between decoded VAE tiles, averaged where they overlap (default: --stride)."),
    decode_batch: int = typer.Option(default(PanoramaConfig, "decode_batch"), "--decode-batch", help="VAE tiles decoded at once (memory does not grow with the width)."),
    eval_pos: Optional[str] = typer.Option(None, "--eval-pos", help="x offsets (px) of window-sized crops written as <Prompt>_<pos>.png, e.g. 243,1005 (overrides the prompts file's)."),
    dtype: Optional[str] = typer.Option(None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, else fp32)."),
    out: Path = typer.Option(Path("diffcli-out/panorama"), "--out", help="Output folder: only the images (the 003 wide_images layout, gradable as written); OUT.run.json goes beside it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty output folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out (same options): prompts whose files all exist are skipped."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N, mps."),
    shared: dict = None,
) -> None:
    """Wide or tall images by synchronized diffusion over overlapping windows (SyncTweedies).

    Example: diffcli panorama "A beach scene at sunrise with golden sands" --eval-pos 243,1005 --out wide_images

    Example: diffcli panorama --prompts-file assignment --out wide_images && diffcli eval wide_images --app wide_images
    """
    from .panorama import PanoramaConfig, parse_positions, run as run_panorama
    config = PanoramaConfig(**shared, prompt=prompt, prompts_file=prompts_file, model=model, height=height,
                            width=width, window=window, stride=stride, negative_prompt=negative_prompt,
                            seed=seed, sync=sync, noise=noise, view_batch=view_batch, decode_stride=decode_stride,
                            decode_batch=decode_batch, eval_pos=parse_positions(eval_pos), dtype=dtype)
    result = run_panorama(config, out, overwrite, device, {"out": str(out), "device": device}, resume=resume)
    if result["main"]:
        skipped = f" ({result['skipped']} prompt(s) already there)" if resume else ""
        typer.echo(f"wrote {result['images']} image(s) of {result['windows']} windows and {result['crops']} crop(s)"
                   f"{skipped} to {result['out']}")


@app.command()
@handle_errors
@with_config
@shared_options(AnagramConfig, GuidanceOptions, SamplingOptions)
def anagram(
    prompts: Optional[List[str]] = typer.Argument(None, help="One prompt per view, in the order of --views."),
    views: Optional[List[str]] = typer.Option(None, "--views", help=f"Views, one per prompt (default: identity rotate_cw): {', '.join(VIEWS)}. '--views identity rotate_cw', '--views identity,rotate_cw' and repeating --views all work."),
    prompts_file: Optional[str] = typer.Option(None, "--prompts-file", help="003 ambiguous_image_prompts.json (canonical_prompt, instance_prompt per entry): runs every pair; 'assignment' = the shipped 003 set."),
    model: str = typer.Option(default(AnagramConfig, "model"), "--model", help="DeepFloyd IF stage I pipeline: a local folder or a hub id in the cache."),
    sr_model: str = typer.Option(default(AnagramConfig, "sr_model"), "--sr-model", help="DeepFloyd IF stage II pipeline, or 'none' for stage I images only."),
    height: Optional[int] = typer.Option(None, help="Stage I height in px (default: the UNet's, 64); stage II is x4."),
    width: Optional[int] = typer.Option(None, help="Stage I width in px (default: the height)."),
    sr_steps: int = typer.Option(default(AnagramConfig, "sr_steps"), "--sr-steps", help="Stage II DDIM steps."),
    sr_cfg: float = typer.Option(default(AnagramConfig, "sr_cfg"), "--sr-cfg", help="Stage II CFG scale."),
    noise_level: int = typer.Option(default(AnagramConfig, "noise_level"), "--noise-level", help="Stage II: noise added to the upsampled stage-I image (timestep of IF's image-noising scheduler)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Prompt of the unconditional CFG branch (default: empty)."),
    seed: int = typer.Option(default(AnagramConfig, "seed"), help="Seed of the canvas noise."),
    sync: str = typer.Option(default(AnagramConfig, "sync"), help="What the views agree on each step: x0 (SyncTweedies), eps, xt, or none (unsynchronized)."),
    noise: str = typer.Option(default(AnagramConfig, "noise"), help="Initial noise: canvas (one draw seen through every view) or views (one draw per view)."),
    view_batch: int = typer.Option(default(AnagramConfig, "view_batch"), "--view-batch", help="Views per network batch (x2 with CFG)."),
    view_seed: int = typer.Option(default(AnagramConfig, "view_seed"), "--view-seed", help="Seed of the permutation views (patch_permute, pixel_permute, jigsaw)."),
    patches: int = typer.Option(default(AnagramConfig, "patches"), help="patch_permute: patches per side."),
    pieces: int = typer.Option(default(AnagramConfig, "pieces"), help="jigsaw: pieces per side."),
    squares: int = typer.Option(default(AnagramConfig, "squares"), help="square_hinge: squares per side."),
    skew: float = typer.Option(default(AnagramConfig, "skew"), help="skew: rows of shift per column."),
    inner_angle: float = typer.Option(default(AnagramConfig, "inner_angle"), "--inner-angle", help="inner_rotate: degrees the central disc turns clockwise."),
    frames: int = typer.Option(default(AnagramConfig, "frames"), help="Animation frames per transition."),
    dtype: Optional[str] = typer.Option(None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, else fp32)."),
    out: Path = typer.Option(Path("diffcli-out/anagram"), "--out", help="Output folder: only the view images (the 003 ambiguous_images layout, gradable as written); OUT.run.json and OUT.animations/ go beside it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty output folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out (same options): prompts whose files all exist are skipped."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N, mps."),
    shared: dict = None,
) -> None:
    """Visual anagrams: one image that shows each prompt under its view, by synchronized DeepFloyd IF.

    Example: diffcli anagram "an oil painting of a horse" "an oil painting of a snowy mountain village" --views identity rotate_cw --out ambiguous_images

    Example: diffcli anagram --prompts-file assignment --out ambiguous_images && diffcli eval ambiguous_images --app ambiguous_images
    """
    from .anagram import AnagramConfig, run as run_anagram
    # click gives an option one value, so in `--views identity rotate_cw` the second name lands among the
    # prompts: a bare view name there is taken as a view (a prompt is never just a view's name)
    names = [v for spec in views or [] for v in spec.replace(",", " ").split()]
    names += [p for p in prompts or [] if p in VIEWS]
    config = AnagramConfig(**shared, prompts=[p for p in prompts or [] if p not in VIEWS], views=names or ["identity", "rotate_cw"],
                           prompts_file=prompts_file, model=model,
                           sr_model=None if sr_model.lower() == "none" else sr_model, height=height, width=width,
                           sr_steps=sr_steps, sr_cfg=sr_cfg, noise_level=noise_level,
                           negative_prompt=negative_prompt, seed=seed, sync=sync, noise=noise, view_batch=view_batch,
                           view_seed=view_seed, patches=patches, pieces=pieces, squares=squares, skew=skew,
                           inner_angle=inner_angle, frames=frames, dtype=dtype)
    result = run_anagram(config, out, overwrite, device, {"out": str(out), "device": device}, resume=resume)
    if result["main"]:
        skipped = f" ({result['skipped']} already there)" if resume else ""
        typer.echo(f"wrote {result['images']} view image(s) of {result['pairs']} anagram(s){skipped} to {result['out']}, "
                   f"their animations to {result['out']}.animations and the run record to {result['out']}.run.json")


@app.command()
@handle_errors
@with_config
@shared_options(PGConfig, GuidanceOptions, SamplingOptions)
def pg(
    prompt: Optional[str] = typer.Argument(None, help="Text prompt; with --model, sample a Stable Diffusion pipeline instead of a digit model."),
    model: Optional[str] = typer.Option(None, "--model", help="Stable Diffusion pipeline: a local folder (save_pretrained layout) or a hub id in the cache."),
    checkpoint: Optional[Path] = typer.Option(None, help="A diffcli model file, a run folder (its latest model), or RUN@STEP (a snapshot of --snapshot-every); default: the shipped MNIST model."),
    n: int = typer.Option(default(PGConfig, "n"), "--n", help="Batch size = number of particles sampled jointly (>= 2 with PG on)."),
    labels: Optional[str] = typer.Option(None, help="Class of each sample, cycled: '0,3,7' or 'all' (default: unconditional)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Pipelines: the prompt of the unconditional CFG branch (default: empty)."),
    seed: int = typer.Option(default(PGConfig, "seed"), help="Sample i uses seed + i (initial noise and sampler noise)."),
    height: Optional[int] = typer.Option(None, help="Pipelines: image height (default: the UNet's sample size x 8)."),
    width: Optional[int] = typer.Option(None, help="Pipelines: image width."),
    compare: bool = typer.Option(default(PGConfig, "compare"), "--compare", help="Also sample the same seeds without PG (in OUT/plain) and report diversity side by side: compare.png, compare.json."),
    classifier: Optional[str] = typer.Option(None, "--classifier", help="Digit classifier for --kernel classifier and --compare (default: the shipped one)."),
    clip_model: str = typer.Option(default(PGConfig, "clip_model"), "--clip-model", help="Pipelines, --kernel clip: open_clip model name or a JSON model config file (as diffcli eval)."),
    clip_pretrained: str = typer.Option(default(PGConfig, "clip_pretrained"), "--clip-pretrained", help="Pipelines, --kernel clip: open_clip pretrained tag or a local weights file (safetensors or a state dict)."),
    dtype: Optional[str] = typer.Option(None, help="Network precision: fp32 (default), fp16 or bf16 (GPU)."),
    out: Path = typer.Option(Path("diffcli-out/pg"), "--out", help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty output folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out: same options; particle sets already drawn (one per context, plain and PG) are kept, the rest drawn, then every output written as one uninterrupted run writes it."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N, mps."),
    context: Optional[str] = typer.Option(None, "--context", help="Next-frame models: sequences of the model's dataset to continue, one particle set of --n each: an index (3), a list (0,4,7) or a range (0:10); or one context file (PNG of the frames side by side, .pt/.safetensors). --compare then reports modes found, L2/IoU to the nearest true future and directional accuracy."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="With --context indices: where the model's MNIST digits are (default: the digits its model file carries, else the folder recorded at training)."),
    shared: dict = None,
) -> None:
    """Particle guidance: sample a batch jointly with a repulsive kernel term, for more modes per batch.

    Example: diffcli pg --n 8 --pg-factor 1.7 --compare --out pg-digits

    Example: diffcli pg --checkpoint runs/circle --context 0:10 --n 8 --compare --out pg-futures

    Example: diffcli pg "a photo of a dog" --model ./sd-v1-5 --n 4 --out pg-dogs
    """
    from .pg import PGConfig, run as run_pg
    config = PGConfig(**shared, checkpoint=str(checkpoint) if checkpoint else None, prompt=prompt, model=model,
                      n=n, labels=labels, negative_prompt=negative_prompt, seed=seed, height=height, width=width, dtype=dtype, classifier=classifier, compare=compare,
                      context=context, data_root=data_root, clip_model=clip_model, clip_pretrained=clip_pretrained)
    result = run_pg(config, out, overwrite, device, {"out": str(out), "device": device}, resume=resume)
    for line in result["lines"]:
        typer.echo(line)
    extra = ", plain/, compare.png, compare.json" if compare else ""
    typer.echo(f"wrote {result['n']} samples, grid.png, run.json{extra} to {result['out']}")


@app.command()
@handle_errors
def info() -> None:
    """Versions, devices and the dtypes they run, and where models are cached.

    Example: diffcli info
    """
    from .info import environment
    for key, value in environment().items():
        if isinstance(value, dict):
            typer.echo(f"{key}:")
            for k, v in value.items():
                typer.echo(f"  {k}: {v}")
        else:
            typer.echo(f"{key}: {', '.join(value) if isinstance(value, list) else value}")


@app.command(name="eval")
@handle_errors
@with_config
def eval_(
    folders: List[str] = typer.Argument(..., metavar="FOLDER...", help="Folder(s) of images to score (or quoted glob patterns); each gets its eval.json (images are never touched)."),
    app_name: Optional[str] = typer.Option(None, "--app", help="003 CLIP score: wide_images (<prompt>_<crop pos>.png) or ambiguous_images (<prompt>.png)."),
    clip_model: str = typer.Option(default(EvalConfig, "clip_model"), "--clip-model", help="open_clip model name, or a JSON model config file (embed_dim, vision_cfg, text_cfg), registered at run time under its file name."),
    clip_pretrained: str = typer.Option(default(EvalConfig, "clip_pretrained"), "--clip-pretrained", help="open_clip pretrained tag (from the cache, downloaded where a network exists) or a local weights file: safetensors or a torch state dict (read with weights_only=True)."),
    quick_gelu: Optional[bool] = typer.Option(None, "--quick-gelu/--no-quick-gelu", help="Activation of the CLIP model (default: what the weights were trained with; a local file counts as the OpenAI weights: QuickGELU for ViT-B-32)."),
    anagram_metrics: Optional[str] = typer.Option(None, "--anagram-metrics", metavar="PROMPTS_JSON", help="Also Visual Anagrams alignment/concealment per pair of this 003 prompt file (implies --app ambiguous_images)."),
    drop_panoramas: bool = typer.Option(default(EvalConfig, "drop_panoramas"), "--drop-panoramas", help="wide_images: leave out files with no crop position (the grader scores them; the score then differs)."),
    fid: Optional[str] = typer.Option(None, "--fid", metavar="REF", help="FID against a reference folder, or a dataset clean-fid has statistics for (NAME[:RES[:SPLIT]], e.g. cifar10:32:train)."),
    kid: Optional[str] = typer.Option(None, "--kid", metavar="REF", help="KID against a reference folder or dataset, as --fid."),
    features: str = typer.Option(default(EvalConfig, "features"), "--features", help="FID/KID features: inception (clean-fid's) or mnist (the digit classifier's 128-d penultimate layer; offline)."),
    classifier: Optional[str] = typer.Option(None, "--classifier", help="Digit classifier for --digits and --features mnist (default: the shipped one)."),
    digits: bool = typer.Option(default(EvalConfig, "digits"), "--digits", help="Class accuracy against the labels in the folder's run.json, modes discovered, in-batch similarity."),
    kid_subsets: int = typer.Option(default(EvalConfig, "kid_subsets"), "--kid-subsets", help="KID: number of random subsets (clean-fid's default)."),
    kid_subset_size: int = typer.Option(default(EvalConfig, "kid_subset_size"), "--kid-subset-size", help="KID: largest subset size (clean-fid's default)."),
    batch_size: int = typer.Option(default(EvalConfig, "batch_size"), "--batch-size", help="Images per network batch."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N, mps."),
    summary: Path = typer.Option(Path("eval-summary"), "--summary", metavar="PATH", help="Several folders: the combined table goes to PATH.csv and PATH.json."),
) -> None:
    """Score folders: the 003 CLIP score exactly as graded, anagram metrics, FID/KID (clean-fid), digit metrics.

    Example: diffcli eval results/wide_images --app wide_images

    Results go to FOLDER/eval.json: a CLIP run writes the grader's layout (source_dir, the first image path of each prompt with its mean, score; indent 4); fid, kid and digits keep their own keys beside it.
    """
    from .eval import EvalConfig, expand_folders, run_many, write_summary
    paths = expand_folders(folders)
    cfg = EvalConfig(folder=paths[0], app=app_name, clip_model=clip_model, clip_pretrained=clip_pretrained,
                     quick_gelu=quick_gelu, anagram_prompts=anagram_metrics, drop_panoramas=drop_panoramas,
                     fid=fid, kid=kid, features=features, classifier=classifier, digits=digits,
                     kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, batch_size=batch_size, device=device)

    def report(folder: str, result: Optional[dict], error: Optional[str]) -> None:
        if error is not None:
            if len(paths) == 1:
                raise DiffcliError(error)
            typer.echo(f"error: {folder}: {error}", err=True)
            return
        for note in result["warnings"]:
            typer.echo(f"warning: {note}", err=True)
        for line in result["lines"]:
            typer.echo(line)
        typer.echo(f"wrote {result['eval_file']}")

    outcome = run_many(cfg, paths, report)
    if len(paths) > 1 and outcome["main"]:
        for line in write_summary(summary, outcome["rows"], outcome["failures"]):
            typer.echo(line)
        typer.echo(f"wrote {summary}.csv and {summary}.json ({len(outcome['rows'])} of {len(paths)} folders scored)")
    if outcome["failures"]:
        raise typer.Exit(1)


try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
@with_config
def sweep(
    ctx: typer.Context,
    command: str = typer.Argument(..., help="The command to sweep: sample, seg, panorama, anagram or pg; its own arguments follow."),
    grid: List[str] = typer.Option(..., "--grid", help="KEY=V1,V2,...: an option of the command (blur, seg_scale, cfg, pg_factor, sampler, steps, ...) and its values; repeat for a grid."),
    score: Optional[List[str]] = typer.Option(None, "--score", help="Score every setting as diffcli eval does: digits (sample, pg), fid=REF, kid=REF, clip (panorama, anagram)."),
    features: str = typer.Option("mnist", "--features", help="FID/KID features: mnist (the digit classifier's, offline) or inception."),
    out: Path = typer.Option(Path("diffcli-out/sweep"), "--out", help="Sweep folder: one subfolder per setting, results.csv/json, plot.png, grid.png."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed sweep: scored settings are skipped, a cut one resumes."),
    yes: bool = typer.Option(False, "--yes", help=f"Run a grid of more than {32} settings."),
) -> None:
    """Run a command over a grid of its options, with the same seeds; score each setting; one table, plot and grid.

    Example: diffcli sweep seg "a cat" --steps 30 --grid blur=gaussian_-1_1,gaussian_-1_2,gaussian_-1_5,gaussian_-1_10,gaussian_-1_9999999 --grid seg_scale=1,3 --out ablation

    Example: diffcli sweep sample --n 1000 --grid cfg=1,1.5,2,3 --score digits --score fid=REF5K --out cfg-sweep
    """
    from .sweep import SweepConfig, run as run_sweep
    cfg = SweepConfig(command=command, args=list(ctx.args), grid=grid, scores=score or [], features=features, yes=yes)
    result = run_sweep(cfg, Commands(), out, overwrite, resume,
                       on_setting=lambda name: typer.echo(f"setting {name}", err=True))
    if result["main"]:
        for line in result["lines"]:
            typer.echo(line)
        typer.echo(f"wrote {result['settings']} settings, results.csv, results.json"
                   f"{', plot.png' if result['plot'] else ''} and grid.png to {result['out']}")


@app.command()
@handle_errors
def rerun(
    record: Path = typer.Argument(..., metavar="RUN_JSON", help="The run record of a diffcli run: OUT/run.json, OUT.run.json (panorama, anagram), or the folder OUT."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the rerun (default: the run's folder + '-rerun'); refused if not empty unless --overwrite."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty output folder."),
) -> None:
    """Run a command again from the run.json it wrote: the same command line, in the same working folder, into a
    new output folder (the same files, byte for byte, on the same machine and versions).

    Example: diffcli rerun digits/run.json --out digits-again
    """
    from .rerun import read_record, record_and_folder, replay_argv, working_folder
    path, folder = record_and_folder(record)
    data = read_record(path)
    argv = replay_argv(data, out or folder.with_name(folder.name + "-rerun"))
    if overwrite:
        argv.append("--overwrite")
    typer.echo(f"diffcli {' '.join(argv)}", err=True)
    with working_folder(data):
        code = Commands().run(argv[0], argv[1:])
    if code:
        raise typer.Exit(code)


# ---------------------------------------------------------------- commands run by argv in this process

class _Checked(BaseException):
    """Raised in place of a command's work once its options are checked (a dry run; not an error)."""


class Commands:
    """diffcli's own commands run by their argv in this process: a sweep's settings, a rerun (sweep.Commands)."""

    def options(self, command: str) -> dict[str, str]:
        """Grid keys -> the command's flag, for every option except where output goes: a key is the flag without
        dashes, '-' as '_' (--seg-scale: seg_scale; --blur: blur; both --cfg and --guidance)."""
        names = {}
        for p in typer.main.get_command(app).commands[command].params:
            flags = [o for o in p.opts if o.startswith("--")]
            if flags and p.name not in ("out", "overwrite", "resume", "device"):
                names.update({flag[2:].replace("-", "_"): flags[0] for flag in flags})
        return names

    def check(self, command: str, argv: list[str]) -> None:
        """Parse and validate the command's options (its module's `validate`) and stop before any work; a refused
        option raises its DiffcliError instead of printing it."""
        module = importlib.import_module(f".{command}", __package__)
        real = module.run

        def stop(cfg: Any, *args: Any, **kwargs: Any) -> None:
            module.validate(cfg)
            raise _Checked

        module.run, _state["reraise"] = stop, True
        try:
            self.run(command, argv)
        except _Checked:
            pass
        finally:
            module.run, _state["reraise"] = real, False

    def run(self, command: str, argv: list[str]) -> int:
        """`diffcli COMMAND ARGV` in this process; its errors print their one line; returns the exit code."""
        outer, sys.argv = sys.argv, ["diffcli", command, *map(str, argv)]  # what the run's run.json records
        try:
            code = typer.main.get_command(app).main(args=[command, *argv], prog_name="diffcli", standalone_mode=False)
        except click_exceptions.UsageError as e:
            raise DiffcliError(f"diffcli {command}: {e.format_message()}") from None
        finally:
            sys.argv = outer
        return code if isinstance(code, int) else 0


def run() -> None:
    """Entry point: click's usage errors become one `error:` line too (exit 2)."""
    click_exc = click_exceptions
    try:
        code = app(standalone_mode=False)
    except click_exc.NoArgsIsHelpError as e:
        e.show()
        code = 2
    except click_exc.UsageError as e:  # bad option values, unknown options or commands
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        typer.echo(f"error: {e.format_message()}{hint}", err=True)
        code = 2
    except typer.Abort:
        typer.echo("interrupted", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
