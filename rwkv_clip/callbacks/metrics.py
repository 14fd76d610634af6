"""Benchmark metrics as CLIP_benchmark computes them, and the linear probe.

Tie rule: candidates are ranked by a stable descending sort of their scores, so among exactly equal scores the
lower index ranks first, and a hit at K means a positive ranks below K. CLIP_benchmark uses ``torch.topk``, whose
order among ties is unspecified; without exact ties both give the same numbers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_confusion_matrix


def _stable_rank(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Rank (0 = first) of column ``positive[i]`` in row i (ties: lower index first)."""
    pos_score = scores.gather(1, positive[:, None])
    cols = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > pos_score) | ((scores == pos_score) & (cols[None, :] < positive[:, None]))
    return ahead.sum(dim=1)


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts, rows = true class, columns = predicted class."""
    return multiclass_confusion_matrix(preds.cpu(), targets.cpu(), num_classes=num_classes)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """top-1, top-5 (only with at least 5 classes) and mean per-class recall from (N, C) logits and (N,) labels.

    Mean per-class recall is sklearn's ``balanced_accuracy_score`` (what CLIP_benchmark calls): the recall of each
    class present in ``targets``, averaged; a class without samples is ignored even if it was predicted.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1] or len(targets) == 0:
        raise ValueError(f"need logits (N, C) and targets (N,) with N > 0, got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    targets = targets.long()
    # in row chunks: ImageNet's 50k x 1000 comparisons would otherwise make several 50M-element temporaries
    rank = torch.cat([_stable_rank(logits[s : s + 4096].float(), targets[s : s + 4096])
                      for s in range(0, len(targets), 4096)])
    out = {"top1": (rank < 1).float().mean().item()}
    if logits.shape[1] >= 5:
        out["top5"] = (rank < 5).float().mean().item()
    cm = confusion_matrix(logits.argmax(dim=1), targets, logits.shape[1])  # argmax: first maximum, the same tie rule
    support = cm.sum(dim=1)
    out["mean_per_class_recall"] = (cm.diagonal()[support > 0].float() / support[support > 0]).mean().item()
    return out


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@K both ways with several captions per image, under CLIP_benchmark's names.

    ``image_retrieval_recall@K`` (text -> image): per caption, a hit if its image ranks below K; averaged over the
    captions. ``text_retrieval_recall@K`` (image -> text): per image, a hit if any of its captions ranks below K;
    averaged over the images (one without captions is a miss, as in CLIP_benchmark). Scores are made ``chunk`` rows
    at a time, so a 5k x 25k score matrix never exists at once.
    """
    image_emb, text_emb = image_emb.float(), text_emb.float()
    text_to_image = text_to_image.long().to(image_emb.device)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.shape != (n_txt,) or (n_txt and (text_to_image.min() < 0 or text_to_image.max() >= n_img)):
        raise ValueError("text_to_image must give, for each caption, the index of its image in image_emb")
    ks = list(ks)
    t2i, i2t = torch.zeros(len(ks)), torch.zeros(len(ks))
    for s in range(0, n_txt, chunk):
        rank = _stable_rank(text_emb[s : s + chunk] @ image_emb.T, text_to_image[s : s + chunk])
        t2i += torch.stack([(rank < k).sum() for k in ks]).float().cpu()
    cols = torch.arange(n_txt, device=image_emb.device)
    for s in range(0, n_img, chunk):
        scores = image_emb[s : s + chunk] @ text_emb.T  # (b, n_txt)
        rows = torch.arange(s, s + scores.shape[0], device=image_emb.device)
        positive = text_to_image[None, :] == rows[:, None]
        # The best positive of each image: highest score, lowest index among ties; only what precedes it counts.
        best = scores.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
        best_idx = torch.where(positive & (scores == best), cols[None, :], n_txt).min(dim=1, keepdim=True).values
        rank = ((scores > best) | ((scores == best) & (cols[None, :] < best_idx))).sum(dim=1)
        rank[~positive.any(dim=1)] = max(ks)  # no caption: never a hit
        i2t += torch.stack([(rank < k).sum() for k in ks]).float().cpu()
    out = {}
    for i, k in enumerate(ks):
        out[f"image_retrieval_recall@{k}"] = (t2i[i] / max(n_txt, 1)).item()
        out[f"text_retrieval_recall@{k}"] = (i2t[i] / max(n_img, 1)).item()
    return out


def topk_captions(image_emb: torch.Tensor, text_emb: torch.Tensor, k: int = 3) -> torch.Tensor:
    """(N_img, k) indices of each image's best captions, with the same tie rule (for the picture)."""
    scores = image_emb.float() @ text_emb.float().T
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


# ---------------------------------------------------------------- linear probe


def fit_logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int = 100,
    init: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + weight_decay * ||W||^2 (bias not decayed) with full-batch L-BFGS."""
    # Lightning evaluates under inference_mode: leave it (and no_grad) for the fit, on normal tensor copies.
    with torch.inference_mode(False), torch.enable_grad():
        x, y = x.clone(), y.clone()
        w = torch.zeros(x.shape[1], num_classes, device=x.device) if init is None else init[0].clone()
        b = torch.zeros(num_classes, device=x.device) if init is None else init[1].clone()
        w.requires_grad_(True)
        b.requires_grad_(True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-6, tolerance_change=1e-9)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y) + weight_decay * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    weight_decays: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    holdout_fraction: float = 0.2,
    select_by: str = "top1",
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """Pick the weight decay on a seeded hold-out of the train features, refit on all of them, score the test set."""
    if len(train_y) < 2 or len(test_y) == 0:
        raise ValueError(f"linear probe needs >= 2 train and >= 1 test samples, got {len(train_y)} and {len(test_y)}")
    # Standardise with the train statistics, so one weight-decay grid suits any feature scale.
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed)).to(train_x.device)
    n_hold = min(max(1, round(holdout_fraction * len(train_y))), len(train_y) - 1)
    hold, fit = perm[:n_hold], perm[n_hold:]
    best, best_score, init, best_init = None, -1.0, None, None
    for wd in sorted(weight_decays, reverse=True):  # strong to weak, each warm-started from the last
        init = fit_logistic_regression(train_x[fit], train_y[fit], num_classes, wd, max_iter, init)
        m = classification_metrics(train_x[hold] @ init[0] + init[1], train_y[hold])
        score = m.get(select_by, m["top1"])  # no top5 below 5 classes
        if score > best_score:  # a tie keeps the stronger decay
            best, best_score, best_init = wd, score, init
    w, b = fit_logistic_regression(train_x, train_y, num_classes, best, max_iter, best_init)
    return {**classification_metrics(test_x @ w + b, test_y), "weight_decay": best}
