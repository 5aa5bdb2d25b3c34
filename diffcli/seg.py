"""diffcli seg: Smoothed Energy Guidance (Hong 2024) on Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux, with the 000
seed's blurs.

SEG is `guidance.stack` (CFG + SEG + PAG in one batch, optional PG) over the pipeline's denoiser, run by any sampler
of `diffcli.core.samplers` (default: Euler on the scheduler's sigmas = DDIM); the blurs live in `query_blur.py`,
the processor in `attention.py`, the guided steps in `guidance.py`. The run itself (prompts, blurs, outputs) is
`text_images.run_prompts`, shared with `diffcli sample --model`; this module declares seg's options and defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .shared.errors import DiffcliError
from .shared.names import check_file_names, read_prompts_file
from .shared.dist import Dist
from .shared.limits import BATCH_MAX, SIDE_MAX
from .shared.fields import opt, redefault
from .runner import Command, RunContext, generating
from .options import FlowOptions, GuidanceOptions, SamplingOptions
from .core.query_blur import Blur
from .text_images import METRIC_FIELDS, image_stems, sample  # noqa: F401  (seg's names, kept)
from .text_images import check_prompts, planned_files, run_prompts

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


@dataclass(kw_only=True)
class SegConfig(GuidanceOptions, SamplingOptions, FlowOptions):
    prompts: list[str]
    model: str = opt(DEFAULT_MODEL, "--model", panel="model",
                     help="SD 1.x/2.x, SDXL, SD3/SD3.5 or Flux.1 pipeline: a hub id in the cache or a local folder "
                          "(save_pretrained layout).")
    # None: 5, the official SEG-SDXL default (0 or 1 = SEG without CFG); 1 (off) on guidance-distilled Flux
    cfg: float | None = redefault(GuidanceOptions, "cfg", None)
    seg_scale: float | None = redefault(GuidanceOptions, "seg_scale", 3.0)
    sampler: str | None = redefault(SamplingOptions, "sampler", "euler")  # on the scheduler's sigmas: DDIM
    steps: int | None = redefault(SamplingOptions, "steps", 50)
    seed: int = opt(0, panel="sampling", check="seed", per="n", help="Image i of each prompt uses seed + i.")
    n: int = opt(1, "--n", panel="sampling", check="count", high=BATCH_MAX,  # a prompt's images are one network batch
                 help="Images per prompt (one batch).")
    height: int | None = opt(None, panel="sampling", check="count", high=SIDE_MAX,
                             help="Image height (default: the model's native size).")
    width: int | None = opt(None, panel="sampling", check="count", high=SIDE_MAX,
                            help="Image width (non-square allowed).")
    negative_prompt: str | None = opt(None, "--negative-prompt", panel="input",
                                      help="Prompt of the unconditional CFG branch (default: empty).")
    dtype: str | None = opt(None, panel="model", help="fp32, fp16 or bf16 (default: fp16 on CUDA, bf16 for SD3 and "
                                                      "Flux, else fp32).")
    metrics: bool = opt(False, "--metrics", panel="output",
                        help="Write metrics.csv/json: per step, L2 of attention output - input, Laplacian variance, "
                             "Sobel edge entropy of --track-block.")
    track_block: str = opt("mid", "--track-block", panel="output",
                           help="Block (down, mid, up) or layer (d4, m0, u1) whose metrics --metrics logs.")


@dataclass(kw_only=True)
class SegPrompts:
    """The command line's prompts: one as the argument, or a file of them (SegConfig.prompts)."""
    prompt: str | None = opt(None, argument=True, panel="input", help="Text prompt (or --prompts-file).")
    prompts_file: Path | None = opt(None, "--prompts-file", panel="input",
                                    help="One prompt a line (blank lines and # comments skipped).")


def build(values: dict[str, Any]) -> SegConfig:
    """The command line's values -> the config: a prompt or --prompts-file, not both."""
    prompt, prompts_file = values.pop("prompt"), values.pop("prompts_file")
    if prompt is not None and prompts_file is not None:
        raise DiffcliError("give a prompt or --prompts-file, not both")
    prompts = read_prompts_file(prompts_file) if prompts_file is not None else ([prompt] if prompt is not None else [])
    return SegConfig(**values, prompts=prompts)


def validate(cfg: SegConfig) -> list[Blur]:
    """Everything checkable before a model is loaded or a file written; returns the parsed blurs."""
    return check_prompts(cfg, many_blurs=True)


# ---------------------------------------------------------------- the command

def run(cfg: SegConfig, out: Path, overwrite: bool, device_name: str | None, options: dict[str, Any],
        resume: bool = False) -> dict[str, Any]:
    blurs = validate(cfg)
    check_file_names(out, planned_files(cfg, blurs))  # a name too long fails now, not after the sampling
    with Dist(device_name) as dist:
        if cfg.metrics and (resume or dist.world > 1):
            raise DiffcliError("--metrics records one uninterrupted single-process run; drop --resume/torchrun or "
                               "--metrics")
        return run_prompts(cfg, blurs, out, overwrite, resume, dist, options, "seg", default_cfg=5.0)


def main(cfg: SegConfig, ctx: RunContext) -> dict[str, Any]:
    """`diffcli seg`: run every prompt and blur and say what was written."""
    result = run(cfg, ctx.out, ctx.overwrite, ctx.device, ctx.options(), resume=ctx.resume)
    if result["main"]:
        skipped = f" ({result['skipped']} prompt(s) already there)" if ctx.resume else ""
        ctx.echo(f"wrote {result['images']} images ({result['blurs']} blur{'s' if result['blurs'] > 1 else ''})"
                 f"{skipped}, grid.png and run.json to {result['out']}")
    return result


COMMAND = Command(
    "seg", SegConfig, validate, main, build=build, cli=SegPrompts,
    notes=lambda values: {"prompts_file": str(values["prompts_file"]) if values["prompts_file"] else None},
    context=generating("diffcli-out/seg",
                       "Continue an interrupted run in --out (same options): prompts whose images all exist are "
                       "skipped."),
    scores=("fid", "kid"),
    help="""Smoothed Energy Guidance (SEG) on Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux, with gaussian, box and EMA
    query blurs (on SD3/Flux: the image queries of joint attention, after QK-norm and RoPE).

    Example: diffcli seg "a cat" --blur gaussian_-1_10 --blur interpolatedBoxBlur_5_0.5 --out seg-cats

    Example: diffcli seg --prompts-file prompts.txt --model ./sd-v1-5 --guidance 7.5 --regions begin --n 4
    """)
