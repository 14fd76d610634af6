"""Zero-shot metrics, written to match CLIP_benchmark's conventions (DESIGN §6).

Tie rule (everywhere in this file): candidates are ranked by a *stable* descending sort of their scores, so among
exactly equal scores the lower index ranks first. A hit at K means the (best) positive has rank < K. CLIP_benchmark
uses ``torch.topk``, whose order among ties is unspecified; without exact ties both give the same numbers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_confusion_matrix

# DESIGN §6: Pets, Flowers, Caltech-101 and Aircraft are reported as mean per-class accuracy, the rest as top-1.
MEAN_PER_CLASS_DATASETS = ("pets", "flowers", "caltech101", "fgvc_aircraft")


def fill_template(template: str, classname: str) -> str:
    """CLIP_benchmark templates use ``{c}``; OpenAI's use ``{}``. Plain replacement, never ``str.format`` on data."""
    if "{c}" in template:
        return template.replace("{c}", classname)
    if "{}" in template:
        return template.replace("{}", classname)
    raise ValueError(f"template {template!r} has no '{{c}}' (or '{{}}') placeholder for the class name")


@torch.no_grad()
def zeroshot_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    class_batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(D, C) zero-shot weights: per class, embed every filled template, L2-normalise each, average, renormalise.

    Classes are embedded ``class_batch_size`` at a time (x len(templates) prompts per forward), so 1000 classes x 80
    templates never go through the text tower as one batch.
    """
    if not templates:
        raise ValueError("templates is empty: give at least one template such as 'a photo of a {c}.'")
    weights = []
    for start in range(0, len(classnames), class_batch_size):
        names = classnames[start : start + class_batch_size]
        texts = [fill_template(t, c) for c in names for t in templates]
        emb = encode_text(tokenize(texts).to(device)).float()
        emb = F.normalize(emb, dim=-1).view(len(names), len(templates), -1)
        weights.append(F.normalize(emb.mean(dim=1), dim=-1))
    return torch.cat(weights).T


def _stable_rank(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Rank (0 = first) of column ``positive[i]`` in row i, stable descending order (ties: lower index first)."""
    pos_score = scores.gather(1, positive[:, None])
    cols = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > pos_score) | ((scores == pos_score) & (cols[None, :] < positive[:, None]))
    return ahead.sum(dim=1)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """top-1, top-5 (only with >= 5 classes) and mean per-class recall, from (N, C) logits and (N,) targets.

    Mean per-class recall follows sklearn's ``balanced_accuracy_score`` (what CLIP_benchmark calls): recall is averaged
    over the classes present in ``targets``; a class with no samples is ignored even if it was predicted.
    (torchmetrics' ``MulticlassAccuracy(average="macro")`` instead counts a predicted-but-absent class as recall 0.)
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"need logits (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    num_classes = logits.shape[1]
    targets = targets.long()
    # in row chunks: ImageNet's 50k x 1000 comparisons would otherwise make several 50M-element temporaries
    if len(targets) == 0:
        raise ValueError("classification_metrics needs at least one sample")
    chunks = range(0, len(targets), 4096)
    rank = torch.cat([_stable_rank(logits[s : s + 4096].float(), targets[s : s + 4096]) for s in chunks])
    out = {"top1": (rank < 1).float().mean().item()}
    if num_classes >= 5:
        out["top5"] = (rank < 5).float().mean().item()
    # argmax returns the first maximal index: the same tie rule as the stable rank above.
    cm = confusion_matrix(logits.argmax(dim=1), targets, num_classes)
    out["mean_per_class_recall"] = mean_per_class_recall(cm)
    return out


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts, rows = true class, columns = predicted class (torchmetrics)."""
    return multiclass_confusion_matrix(preds.cpu(), targets.cpu(), num_classes=num_classes)


def mean_per_class_recall(cm: torch.Tensor) -> float:
    support = cm.sum(dim=1)
    present = support > 0
    return (cm.diagonal()[present].float() / support[present]).mean().item()


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@K both ways, with several captions per image (DESIGN §6, CLIP_benchmark's metric names).

    ``image_retrieval_recall@K`` (text -> image): per caption, a hit if its image ranks < K; averaged over captions.
    ``text_retrieval_recall@K`` (image -> text): per image, a hit if *any* of its captions ranks < K; averaged over
    images. Images without captions are left out of the image -> text average. Scores are processed ``chunk`` rows
    at a time so 5k x 25k score matrices never exist at once.
    """
    image_emb, text_emb = image_emb.float(), text_emb.float()
    text_to_image = text_to_image.long().to(image_emb.device)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.shape != (n_txt,) or (n_txt and (text_to_image.min() < 0 or text_to_image.max() >= n_img)):
        raise ValueError("text_to_image must give, for each caption, the index of its image in image_emb")
    ks = list(ks)
    t2i_hits = torch.zeros(len(ks))
    for s in range(0, n_txt, chunk):
        rank = _stable_rank(text_emb[s : s + chunk] @ image_emb.T, text_to_image[s : s + chunk])
        t2i_hits += torch.stack([(rank < k).sum() for k in ks]).float().cpu()

    has_caption = torch.zeros(n_img, dtype=torch.bool, device=image_emb.device)
    has_caption[text_to_image] = True
    i2t_hits = torch.zeros(len(ks))
    cols = torch.arange(n_txt, device=image_emb.device)
    for s in range(0, n_img, chunk):
        scores = image_emb[s : s + chunk] @ text_emb.T  # (b, n_txt)
        rows = torch.arange(s, s + scores.shape[0], device=image_emb.device)
        positive = text_to_image[None, :] == rows[:, None]
        # Best positive per image = highest score, lowest index among ties; its rank counts only negatives ahead.
        best = scores.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
        best_idx = torch.where(positive & (scores == best), cols[None, :], n_txt).min(dim=1, keepdim=True).values
        ahead = (scores > best) | ((scores == best) & (cols[None, :] < best_idx))
        rank = ahead.sum(dim=1)[has_caption[s : s + scores.shape[0]]]
        i2t_hits += torch.stack([(rank < k).sum() for k in ks]).float().cpu()

    n_with = int(has_caption.sum())
    out = {}
    for i, k in enumerate(ks):
        out[f"image_retrieval_recall@{k}"] = (t2i_hits[i] / max(n_txt, 1)).item()
        out[f"text_retrieval_recall@{k}"] = (i2t_hits[i] / max(n_with, 1)).item()
    return out


def topk_captions(image_emb: torch.Tensor, text_emb: torch.Tensor, k: int = 3) -> torch.Tensor:
    """(N_img, k) indices of the best captions per image, same stable tie rule (for the picture grid)."""
    scores = image_emb.float() @ text_emb.float().T
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
