"""The benchmark callbacks: zero-shot classification, zero-shot retrieval and the linear probe.

Each reads its sets at setup and, when it runs, calls the plain functions of ``embed`` and ``metrics``; the
shared part (when to run, preprocessing, logging, result files) is ``base.BenchmarkCallback``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from rwkv_clip.callbacks.base import BenchmarkCallback, Env
from rwkv_clip.callbacks.datasets import (
    ClassificationSet,
    EvalDataset,
    RetrievalSet,
    headline_metric,
    load_classification,
    load_retrieval,
)
from rwkv_clip.callbacks.metrics import (
    classification_metrics,
    confusion_matrix,
    linear_probe,
    retrieval_metrics,
    topk_captions,
)
from rwkv_clip.callbacks.viz import confusion_matrix_image, log_image, retrieval_grid


def _labelled(emb: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor, name: str, num_classes: int):
    emb, labels = emb[ok], labels[ok]
    if len(labels) == 0:
        raise RuntimeError(f"dataset {name!r}: no image could be loaded")
    if num_classes and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"dataset {name!r}: labels outside [0, {num_classes}) for {num_classes} class names")
    return emb, labels


class ZeroShotClassification(BenchmarkCallback):
    """Zero-shot top-1, top-5 and mean per-class recall with prompt-ensembled class embeddings.

    Logs ``zeroshot/<set>/{top1,top5,mean_per_class_recall}`` and, for sets of at most 50 classes, the confusion
    matrix as ``zeroshot/<set>/confusion_matrix``.
    """

    task, prefix = "zeroshot_classification", "zeroshot"

    def __init__(
        self,
        datasets: list[EvalDataset],
        root: Optional[str] = None,
        every_n_epochs: int = 1,
        class_batch_size: int = 32,
        image_size: Optional[int] = None,
        tokenizer: Optional[str] = None,
        log_images: bool = True,
        output_dir: Optional[str] = None,
        prog_bar: bool = True,
    ):
        """
        Args:
            class_batch_size: classes per text-tower forward (each with all its templates).
            datasets, root, every_n_epochs, image_size, tokenizer, log_images, output_dir, prog_bar: see
                ``BenchmarkCallback``.
        """
        super().__init__(datasets, root, every_n_epochs, image_size, tokenizer, log_images, output_dir, prog_bar)
        self.class_batch_size = class_batch_size

    def load(self, cfg: EvalDataset) -> ClassificationSet:
        return load_classification(cfg)

    def json_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return {{"top1": "acc1", "top5": "acc5"}.get(k, k): v for k, v in metrics.items()}

    def evaluate(self, env: Env, cfg: EvalDataset, s: ClassificationSet) -> dict[str, float]:
        emb, labels, ok = env.images(s.data, s.indices, cfg)
        classifier = env.classifier(s.classnames, s.templates, self.class_batch_size)
        emb, labels = _labelled(emb, labels, ok, cfg.name, len(s.classnames))
        logits = 100.0 * emb @ classifier
        if self.log_images and len(s.classnames) <= 50 and env.trainer.global_rank == 0:
            cm = confusion_matrix(logits.argmax(dim=1), labels, len(s.classnames))
            log_image(env.trainer, f"{self.prefix}/{cfg.name}/confusion_matrix", confusion_matrix_image(cm, s.classnames))
        return {**classification_metrics(logits, labels), "num_samples": len(labels), "skipped": int((~ok).sum())}


class ZeroShotRetrieval(BenchmarkCallback):
    """Text-to-image and image-to-text recall@K, with several captions per image.

    Logs ``retrieval/<set>/image_retrieval_recall@K`` (text to image) and ``text_retrieval_recall@K`` (image to
    text), CLIP_benchmark's names, and a grid of ``num_pictures`` images with their top-3 captions (correct ones
    green and marked "[+]") as ``retrieval/<set>/top3_captions``.
    """

    task, prefix = "zeroshot_retrieval", "retrieval"

    def __init__(
        self,
        datasets: list[EvalDataset],
        root: Optional[str] = None,
        every_n_epochs: int = 1,
        recall_k: list[int] = [1, 5, 10],
        num_pictures: int = 8,
        image_size: Optional[int] = None,
        tokenizer: Optional[str] = None,
        log_images: bool = True,
        output_dir: Optional[str] = None,
        prog_bar: bool = True,
    ):
        """
        Args:
            recall_k: the K of recall@K.
            num_pictures: images per set in the top-captions picture.
            datasets, root, every_n_epochs, image_size, tokenizer, log_images, output_dir, prog_bar: see
                ``BenchmarkCallback``.
        """
        self.recall_k, self.num_pictures = list(recall_k), num_pictures
        super().__init__(datasets, root, every_n_epochs, image_size, tokenizer, log_images, output_dir, prog_bar)
        names = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in self.recall_k]
        for cfg in self.datasets:
            if headline_metric(cfg, self.task) not in names:
                raise ValueError(f"dataset {cfg.name!r}: metric must be one of {names}, got {cfg.metric!r}")

    def load(self, cfg: EvalDataset) -> RetrievalSet:
        return load_retrieval(cfg)

    def evaluate(self, env: Env, cfg: EvalDataset, s: RetrievalSet) -> dict[str, float]:
        emb, _, ok = env.images(s.data, s.indices, cfg, labels=False)
        loaded = ok.nonzero().squeeze(1).tolist()  # the captions of an image that failed to load go with it
        texts, text_to_image = [], []
        for row, position in enumerate(loaded):
            captions = s.captions[s.indices[position]]
            texts += captions
            text_to_image += [row] * len(captions)
        if not texts:
            raise RuntimeError(f"dataset {cfg.name!r}: no image with a caption could be loaded")
        emb, txt = emb[ok], env.texts(texts, cfg)
        text_to_image = torch.tensor(text_to_image, device=emb.device)
        if self.log_images and self.num_pictures > 0 and env.trainer.global_rank == 0:
            # spread over the set (sets are often sorted by class)
            rows = torch.linspace(0, len(loaded) - 1, min(self.num_pictures, len(loaded))).round().long().unique()
            top = topk_captions(emb[rows.to(emb.device)], txt, 3).tolist()
            images = [s.data[s.indices[loaded[r]]][0] for r in rows.tolist()]
            captions = [[texts[i] for i in row] for row in top]
            correct = [[int(text_to_image[i]) == r for i in row] for r, row in zip(rows.tolist(), top)]
            log_image(env.trainer, f"{self.prefix}/{cfg.name}/top3_captions", retrieval_grid(images, captions, correct))
        return {**retrieval_metrics(emb, txt, text_to_image, self.recall_k), "num_samples": len(loaded),
                "num_texts": len(texts), "skipped": int((~ok).sum())}


class LinearProbe(BenchmarkCallback):
    """Logistic regression on frozen image features: ``linear_probe/<set>/...`` and the chosen ``weight_decay``.

    A set is fitted on its ``train_split`` (e.g. CIFAR's ``train``) and scored on its ``split``; a set without
    ``train_split`` is split in two (seeded), ``train_fraction`` of it to fit.
    """

    task, prefix = "linear_probe", "linear_probe"
    needs_text = False

    def __init__(
        self,
        datasets: list[EvalDataset],
        root: Optional[str] = None,
        every_n_epochs: int = 1,
        weight_decays: list[float] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
        holdout_fraction: float = 0.2,
        train_fraction: float = 0.5,
        max_iter: int = 100,
        seed: int = 0,
        image_size: Optional[int] = None,
        output_dir: Optional[str] = None,
        prog_bar: bool = True,
    ):
        """
        Args:
            weight_decays: the grid for the L2 penalty on the probe's weights.
            holdout_fraction: the share of the train split held out to choose the weight decay.
            train_fraction: for sets without ``train_split``: the share that fits the probe.
            max_iter: L-BFGS iterations per fit.
            seed: of the hold-out and of the train/test split of sets without ``train_split``.
            datasets, root, every_n_epochs, image_size, output_dir, prog_bar: see ``BenchmarkCallback``.
        """
        super().__init__(datasets, root, every_n_epochs, image_size, None, False, output_dir, prog_bar)
        if not weight_decays:
            raise ValueError("weight_decays is empty")
        for name, value in (("holdout_fraction", holdout_fraction), ("train_fraction", train_fraction)):
            if not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        self.weight_decays, self.holdout_fraction, self.train_fraction = list(weight_decays), holdout_fraction, train_fraction
        self.max_iter, self.seed = max_iter, seed

    def load(self, cfg: EvalDataset) -> tuple[ClassificationSet, ClassificationSet]:
        test = load_classification(cfg, prompts=False)
        if cfg.train_split:
            return load_classification(cfg, split=cfg.train_split, prompts=False), test
        perm = torch.randperm(len(test.indices), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_train = round(self.train_fraction * len(perm))
        pick = lambda positions: replace(test, indices=sorted(test.indices[p] for p in positions))  # noqa: E731
        return pick(perm[:n_train]), pick(perm[n_train:])

    def json_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        names = {"top1": "lp_acc1", "top5": "lp_acc5", "mean_per_class_recall": "lp_mean_per_class_recall"}
        return {names.get(k, k): v for k, v in metrics.items()}

    def evaluate(self, env: Env, cfg: EvalDataset, sets: tuple[ClassificationSet, ClassificationSet]) -> dict:
        train, test = sets
        n_cls = len(test.classnames)
        train_x, train_y = _labelled(*env.images(train.data, train.indices, cfg), cfg.name, n_cls)
        test_x, test_y, ok = env.images(test.data, test.indices, cfg)
        test_x, test_y = _labelled(test_x, test_y, ok, cfg.name, n_cls)
        n_cls = n_cls or int(torch.cat([train_y, test_y]).max()) + 1
        # Every rank fits the same probe on the same gathered features: nothing to broadcast.
        m = linear_probe(train_x, train_y, test_x, test_y, n_cls, self.weight_decays, self.holdout_fraction,
                         headline_metric(cfg, self.task), self.max_iter, self.seed)
        return {**m, "num_samples": len(test_y), "skipped": len(train.indices) + len(test.indices) - len(train_y)
                - len(test_y)}
