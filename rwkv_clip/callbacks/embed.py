"""Embedding for evaluation, split across ranks: images, texts and the zero-shot classifier.

Each rank embeds positions ``rank, rank + world, ...`` of a list, padded to the same count on every rank, so every
rank runs the same number of forwards and of all-gathers whatever the sizes (a rank that ran one collective fewer
would hang the others). The gathered rows come back in the list's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Ranks:
    """This process's place among the evaluating processes, and the all-gather that joins them."""

    rank: int = 0
    world: int = 1
    all_gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # (n, ...) -> (world, n, ...)

    def share(self, n: int) -> list[int]:
        """This rank's positions of ``range(n)``, padded with position 0 to ``ceil(n / world)``."""
        mine = list(range(self.rank, n, self.world))
        return mine + [0] * (-(-n // self.world) - len(mine))

    def gather(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's rows for ``share(n)``, in the order of ``range(n)``."""
        if self.world == 1:
            return rows[:n]
        gathered = self.all_gather(rows.contiguous())  # (world, per, ...): row j of rank r is position j*world + r
        return gathered.transpose(0, 1).reshape(-1, *rows.shape[1:])[:n]


class _Transformed(Dataset):
    """(image tensor, int label or -1, loaded?) for ``data[indices[j]]``. An image that fails to load gives a blank
    one marked not loaded, so batches keep their size and every rank its number of forwards."""

    def __init__(self, data: Any, indices: Sequence[int], transform: Callable, labels: bool):
        self.data, self.indices, self.transform, self.labels = data, list(indices), transform, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = self.indices[j]
        try:
            image, target = self.data[i]
            return self.transform(image), int(target) if self.labels else -1, True
        except (OSError, ValueError, SyntaxError) as e:  # corrupt or truncated image files
            print(f"[eval] skipping sample {i}: {type(e).__name__}: {e}")
            return self.transform(Image.new("RGB", (64, 64))), -1, False


def embed_images(
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    data: Any,
    indices: Sequence[int],
    transform: Callable,
    ranks: Ranks = Ranks(),
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    labels: bool = True,
    desc: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised float32 embeddings of ``data[i]`` for i in ``indices``, their labels (-1 without ``labels``)
    and whether each image loaded; ``data`` yields (PIL image, target)."""
    n = len(indices)
    if n == 0:
        raise ValueError(f"{desc or 'the evaluation set'}: no samples to embed")
    mine = [indices[p] for p in ranks.share(n)]
    loader = DataLoader(_Transformed(data, mine, transform, labels), batch_size=batch_size, num_workers=num_workers)
    embs, labs, oks = [], [], []
    for images, label, ok in tqdm(loader, desc=desc, leave=False, disable=desc is None or ranks.rank != 0):
        embs.append(F.normalize(encode_image(images.to(device)).float(), dim=-1))
        labs.append(label)
        oks.append(ok)
    emb, lab, ok = torch.cat(embs), torch.cat(labs).to(device), torch.cat(oks).to(device, torch.long)
    return ranks.gather(emb, n), ranks.gather(lab, n), ranks.gather(ok, n).bool()


def embed_texts(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    ranks: Ranks = Ranks(),
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(len(texts), D) L2-normalised float32 text embeddings."""
    mine = [texts[p] for p in ranks.share(len(texts))]
    embs = [F.normalize(encode_text(tokenize(mine[s : s + batch_size]).to(device)).float(), dim=-1)
            for s in range(0, len(mine), batch_size)]
    return ranks.gather(torch.cat(embs), len(texts))


def fill_template(template: str, classname: str) -> str:
    """CLIP_benchmark's templates mark the class name with ``{c}``, OpenAI's with ``{}``; never ``str.format`` data."""
    if "{c}" in template:
        return template.replace("{c}", classname)
    if "{}" in template:
        return template.replace("{}", classname)
    raise ValueError(f"template {template!r} has no '{{c}}' (or '{{}}') placeholder for the class name")


def zeroshot_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    ranks: Ranks = Ranks(),
    class_batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(D, C) zero-shot weights: per class, embed every filled template, L2-normalise each, average, renormalise.

    ``class_batch_size`` classes (times the templates) go through the text tower at once, so 1000 classes x 80
    templates never make one batch.
    """
    if not templates:
        raise ValueError("templates is empty: give at least one template such as 'a photo of a {c}.'")
    mine = [classnames[p] for p in ranks.share(len(classnames))]
    weights = []
    for s in range(0, len(mine), class_batch_size):
        names = mine[s : s + class_batch_size]
        texts = [fill_template(t, c) for c in names for t in templates]
        emb = F.normalize(encode_text(tokenize(texts).to(device)).float(), dim=-1)
        weights.append(F.normalize(emb.view(len(names), len(templates), -1).mean(dim=1), dim=-1))
    return ranks.gather(torch.cat(weights), len(classnames)).T
