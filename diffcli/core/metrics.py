"""Pure metrics: tensors (or clean-fid's numpy features) in, numbers or tensors out; nothing is read, written or
printed here.

- CLIP score pieces (the 003 protocol): each image's cosine with its prompt, means within prompt groups.
- Visual Anagrams: alignment and concealment from view x prompt similarity matrices.
- FID and KID from features, with clean-fid's own estimators (so numbers match its compute_fid / compute_kid).
- Digits: mean pairwise cosine (in-batch similarity), and the digit record (accuracy, modes) from logits.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- CLIP score

def cosine_per_image(image_emb: torch.Tensor, text_emb: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    """Raw cosine similarity of each image with its own prompt (no x100, unlike torchmetrics' CLIPScore)."""
    return (image_emb * text_emb[prompt_index]).sum(-1)


def group_means(values: torch.Tensor, group_index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of `values` within each group (float64, as the grader's Python floats)."""
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_index, values.double())
    return sums / torch.bincount(group_index, minlength=n_groups).double()


def anagram_scores(sim: torch.Tensor, logit_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual Anagrams: (P,V,V) view x prompt cosine matrices -> alignment and concealment per pair.

    Alignment is the worst view's similarity with its own prompt (min of the diagonal); concealment is the mean
    of the diagonals of the softmax over prompts (each view picks its prompt) and over views (each prompt picks
    its view), at CLIP's own temperature.
    """
    alignment = sim.diagonal(dim1=-2, dim2=-1).min(-1).values
    logits = logit_scale * sim.double()
    by_prompt = logits.softmax(-1).diagonal(dim1=-2, dim2=-1)
    by_view = logits.softmax(-2).diagonal(dim1=-2, dim2=-1)
    return alignment, (by_prompt.mean(-1) + by_view.mean(-1)) / 2


# ---------------------------------------------------------------- FID / KID from features
# clean-fid (and scipy under it) is imported where it is used: it takes seconds to load, and only FID/KID need it.

def frechet_distance(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """FID of features (N, D) against a reference's mean and covariance (clean-fid's estimator)."""
    from cleanfid import fid
    with contextlib.redirect_stdout(io.StringIO()):  # clean-fid prints its numerical warnings
        return float(fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref_mu, ref_sigma))


def kernel_distance(feats: np.ndarray, ref_feats: np.ndarray, subsets: int, subset_size: int, seed: int = 0) -> float:
    """clean-fid's KID estimator (cubic polynomial kernel, unbiased MMD^2 over random subsets), seeded."""
    from cleanfid import fid
    state = np.random.get_state()
    np.random.seed(seed)  # clean-fid draws its subsets from numpy's global generator
    try:
        return float(fid.kernel_distance(ref_feats, feats, num_subsets=subsets, max_subset_size=subset_size))
    finally:
        np.random.set_state(state)


# ---------------------------------------------------------------- digits

def pca_2d(feats: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, 2): the points projected on their two principal axes (centred; signs fixed so that each axis'
    largest loading is positive, so a plot does not flip between runs)."""
    x = feats.double() - feats.double().mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    axes = v[:2].T
    idx = axes.abs().argmax(0)
    axes = axes * torch.sign(axes[idx, torch.arange(axes.shape[1])])
    return x @ axes


def mean_pairwise_cosine(feats: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all pairs i != j (PG's in-batch similarity; higher = less diverse)."""
    f = F.normalize(feats.double(), dim=-1)
    n = len(f)
    s = f @ f.T
    return (s.sum() - s.diagonal().sum()) / (n * (n - 1))


def digit_record(logits: torch.Tensor, feats: torch.Tensor, labels: list[int] | None) -> dict[str, Any]:
    """Modes discovered, predicted classes and in-batch similarity of classified digits; accuracy and the
    similarity within each label where the requested labels are known."""
    pred = logits.argmax(1)
    record: dict[str, Any] = {"n": len(pred), "modes_discovered": int(pred.unique().numel()),
                              "predicted_classes": torch.bincount(pred, minlength=logits.shape[1]).tolist(),
                              "mean_similarity": float(mean_pairwise_cosine(feats)) if len(pred) > 1 else None}
    if labels is not None:
        y = torch.tensor(labels)
        record["accuracy"] = float((pred == y).double().mean())
        record["classes_requested"] = int(y.unique().numel())
        within = [mean_pairwise_cosine(feats[y == k]) for k in y.unique() if int((y == k).sum()) > 1]
        record["mean_similarity_within_label"] = float(torch.stack(within).mean()) if within else None
    return record


def seam_figure(image: torch.Tensor) -> dict[str, float]:
    """How visible the join of a 360-degree panorama is: image (C, H, W) in [0, 1]. `join` is the mean absolute
    change from the last column to the first (what the eye crosses when the picture wraps), `inside` the mean
    absolute change between neighbouring columns inside the image, `ratio` join / inside: about 1 when the join is
    as smooth as the rest, well above 1 for a visible seam."""
    x = image.double()
    join = float((x[..., 0] - x[..., -1]).abs().mean())
    inside = float((x[..., 1:] - x[..., :-1]).abs().mean())
    return {"join": join, "inside": inside, "ratio": join / inside if inside > 0 else float("inf")}
