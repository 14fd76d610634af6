"""Zero-shot classification and image-text retrieval callbacks (DESIGN §6, CLIP_benchmark conventions)."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch

from rwkv_clip.callbacks.base import BenchmarkCallback, gather_rows
from rwkv_clip.callbacks.datasets import (
    ClassificationSet,
    EvalDataset,
    RetrievalSet,
    build_classification,
    build_retrieval,
)
from rwkv_clip.callbacks.metrics import (
    MEAN_PER_CLASS_DATASETS,
    classification_metrics,
    confusion_matrix,
    retrieval_metrics,
    topk_captions,
    zeroshot_classifier,
)
from rwkv_clip.callbacks.viz import confusion_matrix_image, log_image, retrieval_grid

CLIP_BENCHMARK_NAMES = {"top1": "acc1", "top5": "acc5"}


def headline_metric(cfg: EvalDataset) -> str:
    if cfg.metric not in (None, "top1", "top5", "mean_per_class_recall"):
        raise ValueError(
            f"dataset {cfg.name!r}: metric must be top1, top5 or mean_per_class_recall, got {cfg.metric!r}"
        )
    return cfg.metric or ("mean_per_class_recall" if cfg.name in MEAN_PER_CLASS_DATASETS else "top1")


class ZeroShotClassification(BenchmarkCallback):
    """Zero-shot top-1 / top-5 / mean per-class recall with prompt-ensembled class embeddings.

    Logs ``zeroshot/<dataset>/{top1,top5,mean_per_class_recall}``; the confusion matrix of the dataset with the
    fewest classes goes to TensorBoard as ``zeroshot/<dataset>/confusion_matrix``.
    """

    task = "zeroshot_classification"
    prefix = "zeroshot"

    def __init__(
        self,
        datasets: list[EvalDataset],
        every_n_epochs: int = 1,
        class_batch_size: int = 32,
        tokenizer: Optional[str] = None,
        image_size: Optional[int] = None,
        log_images: bool = True,
        output_dir: Optional[str] = None,
        prog_bar: bool = True,
    ):
        """
        Args:
            class_batch_size: classes per text-tower forward (each brings all its templates).
            datasets: evaluation sets (see ``rwkv_clip.callbacks.EvalDataset``): name, source, root, split, ...
            every_n_epochs: during fit, run after every N-th epoch (and always under validate / test).
            tokenizer: tokenizer file for standalone use; default ``trainer.datamodule.tokenizer``.
            image_size: build a CLIP eval transform of this size; default ``trainer.datamodule.eval_transform``.
            log_images: add the pictures to TensorBoard once per evaluation.
            output_dir: where validate / test write the result JSONs; default ``trainer.log_dir``.
            prog_bar: show each dataset's headline metric in the progress bar.
        """
        super().__init__(datasets, every_n_epochs, tokenizer, image_size, log_images, output_dir, prog_bar)
        self.class_batch_size = class_batch_size

    def build(self, cfg: EvalDataset) -> ClassificationSet:
        headline_metric(cfg)  # a bad metric name fails here, at start-up
        return build_classification(cfg)

    def headline(self, cfg: EvalDataset) -> str:
        return headline_metric(cfg)

    def json_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return {CLIP_BENCHMARK_NAMES.get(k, k): v for k, v in metrics.items()}

    def classifier(self, trainer: pl.Trainer, pl_module: pl.LightningModule, cs: ClassificationSet) -> torch.Tensor:
        """(D, C) classifier; ranks split the classes (interleaved), each in batches of class_batch_size."""
        rank, world = trainer.global_rank, trainer.world_size
        mine = list(range(rank, len(cs.classnames), world))
        encode, tok, device = self.encode_text_fn(trainer, pl_module), self.tokenizer(trainer), pl_module.device
        weights, pos = [], []
        for s in range(0, len(mine), self.class_batch_size):
            p = mine[s : s + self.class_batch_size]
            names = [cs.classnames[i] for i in p]
            weights.append(zeroshot_classifier(encode, tok, names, cs.templates, self.class_batch_size, device).T)
            pos.append(torch.tensor(p))
        w, _, _ = gather_rows(trainer, len(cs.classnames), pos, weights, None, device)
        return w.T

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        results, smallest = {}, None
        for cs in self._sets:
            emb, labels, _ = self.embed_images(trainer, pl_module, cs.source, cs.indices, cs.cfg)
            if len(labels) == 0:
                raise RuntimeError(f"dataset {cs.cfg.name!r}: no image could be loaded")
            n_cls = len(cs.classnames)
            if int(labels.max()) >= n_cls or int(labels.min()) < 0:
                raise ValueError(f"dataset {cs.cfg.name!r}: labels outside [0, {n_cls}) for {n_cls} classnames")
            logits = 100.0 * emb @ self.classifier(trainer, pl_module, cs)
            m = classification_metrics(logits, labels)
            m["num_samples"], m["skipped"] = len(labels), len(cs.indices) - len(labels)
            results[cs.cfg.name] = m
            if smallest is None or n_cls < smallest[1]:
                smallest = (cs, n_cls, logits.argmax(dim=1), labels)
        if self.log_images and smallest is not None and trainer.global_rank == 0 and trainer.loggers:
            cs, n_cls, preds, labels = smallest
            cm = confusion_matrix(preds, labels, n_cls)
            tag = f"{self.prefix}/{cs.cfg.name}/confusion_matrix"
            log_image(trainer, tag, confusion_matrix_image(cm, cs.classnames))
        return results


class ZeroShotRetrieval(BenchmarkCallback):
    """Text->image and image->text recall@1/5/10 with several captions per image.

    Logs ``retrieval/<dataset>/{image,text}_retrieval_recall@{1,5,10}`` (CLIP_benchmark names: image_retrieval =
    text->image, text_retrieval = image->text) and a grid of ``num_pictures`` images spread over the first dataset,
    each with its top-3 captions (correct ones green and marked "[+]"), as ``retrieval/<dataset>/top3_captions``.
    """

    task = "zeroshot_retrieval"
    prefix = "retrieval"

    def __init__(
        self,
        datasets: list[EvalDataset],
        every_n_epochs: int = 1,
        recall_k: list[int] = [1, 5, 10],
        num_pictures: int = 8,
        tokenizer: Optional[str] = None,
        image_size: Optional[int] = None,
        log_images: bool = True,
        output_dir: Optional[str] = None,
        prog_bar: bool = True,
    ):
        """
        Args:
            recall_k: the K of recall@K.
            num_pictures: images (of the first dataset) in the top-3-captions picture.
            datasets: evaluation sets (see ``rwkv_clip.callbacks.EvalDataset``): name, source, root, split, ...
            every_n_epochs: during fit, run after every N-th epoch (and always under validate / test).
            tokenizer: tokenizer file for standalone use; default ``trainer.datamodule.tokenizer``.
            image_size: build a CLIP eval transform of this size; default ``trainer.datamodule.eval_transform``.
            log_images: add the pictures to TensorBoard once per evaluation.
            output_dir: where validate / test write the result JSONs; default ``trainer.log_dir``.
            prog_bar: show each dataset's headline metric in the progress bar.
        """
        super().__init__(datasets, every_n_epochs, tokenizer, image_size, log_images, output_dir, prog_bar)
        self.recall_k, self.num_pictures = list(recall_k), num_pictures

    def build(self, cfg: EvalDataset) -> RetrievalSet:
        names = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in self.recall_k]
        if cfg.metric is not None and cfg.metric not in names:
            raise ValueError(f"dataset {cfg.name!r}: metric must be one of {names}, got {cfg.metric!r}")
        return build_retrieval(cfg)

    def headline(self, cfg: EvalDataset) -> str:
        return cfg.metric or "image_retrieval_recall@1"

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        results = {}
        for n, rs in enumerate(self._sets):
            img_emb, _, pos = self.embed_images(trainer, pl_module, rs.source, rs.indices, rs.cfg)
            if len(pos) == 0:
                raise RuntimeError(f"dataset {rs.cfg.name!r}: no image could be loaded")
            # Captions of images that failed to load are left out with them.
            row_of = torch.full((len(rs.indices),), -1, dtype=torch.long)
            row_of[pos.cpu()] = torch.arange(len(pos))
            texts, t2i = [], []
            for j, caps in enumerate(rs.captions):
                if row_of[j] >= 0:
                    texts += caps
                    t2i += [int(row_of[j])] * len(caps)
            txt_emb = self.embed_texts(trainer, pl_module, texts, rs.cfg.batch_size)
            t2i = torch.tensor(t2i, device=img_emb.device)
            m = retrieval_metrics(img_emb, txt_emb, t2i, self.recall_k)
            m["num_samples"], m["num_texts"], m["skipped"] = len(pos), len(texts), len(rs.indices) - len(pos)
            results[rs.cfg.name] = m
            if n == 0 and self.log_images and trainer.global_rank == 0 and trainer.loggers and self.num_pictures > 0:
                # evenly spread over the set (eval sets are often sorted by class)
                rows = torch.linspace(0, len(pos) - 1, min(self.num_pictures, len(pos))).round().long().unique()
                top = topk_captions(img_emb[rows.to(img_emb.device)], txt_emb, 3).cpu()
                images = [rs.source.load(rs.indices[int(pos[r])])[0] for r in rows]
                caps = [[texts[i] for i in row] for row in top.tolist()]
                ok = [[int(t2i[i]) == int(r) for i in row] for r, row in zip(rows, top.tolist())]
                log_image(trainer, f"{self.prefix}/{rs.cfg.name}/top3_captions", retrieval_grid(images, caps, ok))
        return results
