"""Our models' drawing loop: EDM (any sampler) or blurring diffusion, per-sample seeds, fixed network groups.

Tensors in, tensors out: the options are resolved and checked by the caller (`diffcli.drawing`), the guidance
(`guidance.Seg` installed in the network, `guidance.PG`) built by it; nothing here reads a file or prints.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

from ..shared.devices import PerSampleRandn
from .blurring import get_ts, sample_blurring, schedule_of
from .guidance import Guidance
from .samplers import run_sampler
from .schedules import NoiseLevels, schedule_sigmas


def draw_batches(model, meta: dict[str, Any], indices: Sequence[int], device: torch.device, *,
                 sampler: str | None, steps: int, sigma_min: float | None, sigma_max: float | None, rho: float,
                 knobs: dict[str, Any], seed: int, batch_size: int, labels: list[int] | None, guidance: Guidance,
                 trajectory: bool = False, clip_denoised: bool = False, schedule: str | None = None,
                 on_step: Callable[[int], None] | None = None, context: torch.Tensor | None = None,
                 ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Yields (sample indices, images (B,C,H,W) in [-1,1], trajectory or None) per batch (`batches`).

    Sample i starts from seed + i (its initial and per-step noise) with label labels[i] (None: unconditional);
    `guidance` holds the run's terms (CFG against the model's null label, SEG, PG). An EDM model (meta kind "edm") runs `sampler` on
    `schedule` (one of SCHEDULES, default karras, exponent rho) between sigma_max and sigma_min with `knobs`, a blurring one its own reverse process in `steps`.
    With `trajectory`, the batch that holds index 0 also yields (rows, steps, C, H, W) for its first 8 samples:
    x0_hat after each step then the final image (blurring: z_t from t = 1 to 0). `context`: a next-frame model's
    (C_ctx, H, W), shared by every sample.
    """
    blurring = meta["kind"] == "blurring"  # its model predicts eps at time t; CFG mixes eps the same way
    if blurring:
        ts, start_scale = get_ts(steps, device), 1.0
    else:
        sigmas = schedule_sigmas(schedule or "karras", NoiseLevels(sigma_min, sigma_max), steps, rho, device)
        start_scale = sigmas[0]
    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    group = net_group(device)
    for idx in batches(indices, batch_size, None if guidance.pg else group):
        rng = PerSampleRandn([seed + i for i in idx], device)
        x = rng.randn(shape) * start_scale
        cond = {} if context is None else {"context": context.to(device).expand(len(idx), *context.shape)}
        if labels is None:
            both = (cond, cond)
        else:
            y = torch.tensor([labels[i] for i in idx], device=device)
            both = ({"class_labels": y, **cond}, {"class_labels": torch.full_like(y, model.null_label), **cond})
        net = fixed_groups(model, idx, group)
        grouped = guidance.with_guide(lambda guide: fixed_groups(guide, idx, group))  # the guide's rows as the net's
        denoiser = grouped.denoiser(net, *both, None if blurring else sigmas)
        keep = trajectory and 0 in idx
        # blurring: the state z_t itself, from the noise at t = 1 (x0_hat would divide by d_t ~ 0.001)
        frames: list[torch.Tensor] = [x[:8].clamp(-1, 1).cpu()] if blurring and keep else []

        def callback(info: dict[str, Any]) -> None:
            if keep:
                frames.append(info["x" if blurring else "denoised"][:8].clamp(-1, 1).cpu())
            if on_step:
                on_step(len(idx))

        if blurring:
            x = sample_blurring(denoiser, x, ts, schedule_of(meta), callback=callback, noise=rng,
                                clip_denoised=clip_denoised)
        else:
            x = run_sampler(sampler, denoiser, x, sigmas, callback=callback, noise=rng, **knobs)
        images = x.clamp(-1, 1).cpu()
        # rows: samples; columns: x0_hat after each step, then the final image (blurring: z_t from t = 1 to 0)
        yield idx, images, (torch.stack(frames if blurring else frames + [images[:8]], dim=1) if keep else None)


def batches(indices: Sequence[int], batch_size: int, group: int | None = None) -> list[list[int]]:
    """The batches `indices` are sampled in, each at most `batch_size`: runs of it; with `group` (no PG, whose
    particle sets are the batches themselves), whole network groups (`fixed_groups`) packed into each batch, so
    that no group is computed in two batches (a batch below one group still costs a group's network call)."""
    indices = list(indices)
    if group is None:
        return [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][0] // group == i // group:
            runs[-1].append(i)
        else:
            runs.append([i])
    out: list[list[int]] = []
    for run in runs:
        pieces = [run[s:s + batch_size] for s in range(0, len(run), batch_size)]
        if out and len(out[-1]) + len(pieces[0]) <= batch_size:
            out[-1] += pieces.pop(0)
        out += pieces
    return out


def net_group(device: torch.device) -> int:
    """Samples per network call (see `fixed_groups`): 8 on a CPU (no slower than one call for 64 there, measured),
    64 on a GPU (the default --batch-size, so a default run's calls keep their size)."""
    return 8 if torch.device(device).type == "cpu" else 64


def fixed_groups(model, idx: Sequence[int], size: int):
    """`model` called only on fixed groups: sample i sits in row i % size of group i // size (of each role chunk,
    when CFG or SEG stack their passes), rows this batch does not fill repeat a member. The network then always
    runs `size` rows a chunk at fixed places, and since BLAS and convolution kernels pick their blocking (so their
    rounding) by batch size, this is what makes a sample's floats independent of --batch-size, of resume and of
    torchrun ranks. Costs padding where a batch holds part of a group."""
    b = len(idx)
    groups: dict[int, list[tuple[int, int]]] = {}
    for pos, i in enumerate(idx):
        groups.setdefault(i // size, []).append((pos, i % size))

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        rows = x.shape[0]
        k = rows // b  # role chunks: 1, 2 (CFG) or 3 (CFG + SEG), each b rows in batch order
        out = None
        for members in groups.values():
            src = [members[0][0]] * size
            for pos, slot in members:
                src[slot] = pos
            take = torch.tensor([r * b + p for r in range(k) for p in src], device=x.device)
            pick = lambda t: (t.index_select(0, take.to(t.device))  # noqa: E731
                              if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == rows else t)
            y = model(pick(x), pick(sigma), **{name: pick(v) for name, v in kw.items()})
            out = y.new_empty((rows, *y.shape[1:])) if out is None else out
            dst = torch.tensor([r * b + pos for r in range(k) for pos, _ in members], device=y.device)
            out[dst] = y[torch.tensor([r * size + slot for r in range(k) for _, slot in members], device=y.device)]
        return out

    return denoise
