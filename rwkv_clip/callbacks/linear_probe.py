"""Linear probe: multinomial logistic regression on frozen image features (DESIGN §6).

Weight decay is chosen on a held-out part of the train split, then the probe is refit on all of it and scored on
the test split. Full-batch L-BFGS in torch: 2500 640-d features take ~1 s per setting on 2 busy CPU cores.
"""

from __future__ import annotations

from typing import Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from rwkv_clip.callbacks.base import BenchmarkCallback
from rwkv_clip.callbacks.datasets import ClassificationSet, EvalDataset, build_classification
from rwkv_clip.callbacks.metrics import classification_metrics
from rwkv_clip.callbacks.zeroshot import headline_metric


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
        d = x.shape[1]
        w = torch.zeros(d, num_classes, device=x.device) if init is None else init[0].clone()
        b = torch.zeros(num_classes, device=x.device) if init is None else init[1].clone()
        w.requires_grad_(True)
        b.requires_grad_(True)
        opt = torch.optim.LBFGS(
            [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
            tolerance_grad=1e-6, tolerance_change=1e-9,
        )

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
    """Pick weight decay on a seeded hold-out of the train features, refit on all train, report test metrics."""
    if len(train_y) < 2 or len(test_y) == 0:
        raise ValueError(f"linear probe needs >= 2 train and >= 1 test samples, got {len(train_y)} and {len(test_y)}")
    # Standardise with train statistics so one weight-decay grid suits any feature scale.
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train_y), generator=g).to(train_x.device)
    n_hold = min(max(1, int(round(holdout_fraction * len(train_y)))), len(train_y) - 1)
    hold, fit = perm[:n_hold], perm[n_hold:]
    best, best_score, init, best_init = None, -1.0, None, None
    for wd in sorted(weight_decays, reverse=True):  # strong to weak, each warm-started from the last
        init = fit_logistic_regression(train_x[fit], train_y[fit], num_classes, wd, max_iter, init)
        w, b = init
        m = classification_metrics(train_x[hold] @ w + b, train_y[hold])
        score = m.get(select_by, m["top1"])  # top5 does not exist below 5 classes
        if score > best_score:  # ties keep the stronger decay
            best, best_score, best_init = wd, score, init
    w, b = fit_logistic_regression(train_x, train_y, num_classes, best, max_iter, best_init)
    out = classification_metrics(test_x @ w + b, test_y)
    out["weight_decay"] = best
    return out


class LinearProbe(BenchmarkCallback):
    """Linear probe top-1 / top-5 / mean per-class recall: ``linear_probe/<dataset>/...`` (+ chosen weight_decay).

    Each dataset needs labels in a train part and a test part: ``train_split`` (e.g. CIFAR ``train``), or with no
    train_split the eval set itself is split (seeded) by ``probe_train_fraction``.
    """

    task = "linear_probe"
    prefix = "linear_probe"

    def __init__(
        self,
        datasets: list[EvalDataset],
        every_n_epochs: int = 1,
        weight_decays: list[float] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
        holdout_fraction: float = 0.2,
        max_iter: int = 100,
        seed: int = 0,
        tokenizer: Optional[str] = None,
        image_size: Optional[int] = None,
        output_dir: Optional[str] = None,
        prog_bar: bool = True,
    ):
        """
        Args:
            weight_decays: grid for the L2 penalty on the probe's weights.
            holdout_fraction: share of the train split held out to choose the weight decay.
            max_iter: L-BFGS iterations per fit.
            seed: for the hold-out split (and the train/test split of sets without train_split).
            datasets: evaluation sets (see ``rwkv_clip.callbacks.EvalDataset``): name, source, root, split, ...
            every_n_epochs: during fit, run after every N-th epoch (and always under validate / test).
            tokenizer: tokenizer file for standalone use; default ``trainer.datamodule.tokenizer``.
            image_size: build a CLIP eval transform of this size; default ``trainer.datamodule.eval_transform``.
            output_dir: where validate / test write the result JSONs; default ``trainer.log_dir``.
            prog_bar: show each dataset's headline metric in the progress bar.
        """
        super().__init__(datasets, every_n_epochs, tokenizer, image_size, False, output_dir, prog_bar)
        if not weight_decays:
            raise ValueError("weight_decays is empty")
        if not 0 < holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        self.weight_decays, self.holdout_fraction = list(weight_decays), holdout_fraction
        self.max_iter, self.seed = max_iter, seed

    def build(self, cfg: EvalDataset) -> tuple[ClassificationSet, ClassificationSet]:
        headline_metric(cfg)
        test = build_classification(cfg, need_prompts=False)
        if cfg.train_split:
            return build_classification(cfg, split=cfg.train_split, need_prompts=False), test
        if not 0 < cfg.probe_train_fraction < 1:
            raise ValueError(f"dataset {cfg.name!r}: probe_train_fraction must be in (0, 1)")
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(test.indices), generator=g).tolist()
        n_train = int(round(cfg.probe_train_fraction * len(perm)))
        pick = lambda ps: ClassificationSet(cfg, test.source, sorted(test.indices[p] for p in ps), test.classnames, [])
        return pick(perm[:n_train]), pick(perm[n_train:])

    def headline(self, cfg: EvalDataset) -> str:
        return headline_metric(cfg)

    def json_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        names = {"top1": "lp_acc1", "top5": "lp_acc5", "mean_per_class_recall": "lp_mean_per_class_recall"}
        return {names.get(k, k): v for k, v in metrics.items()}

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        results = {}
        for train, test in self._sets:
            cfg = test.cfg
            tr_x, tr_y, _ = self.embed_images(trainer, pl_module, train.source, train.indices, cfg)
            te_x, te_y, _ = self.embed_images(trainer, pl_module, test.source, test.indices, cfg)
            n_cls = len(test.classnames) or int(torch.cat([tr_y, te_y]).max()) + 1
            # Every rank fits the same probe on the same gathered features: no broadcast needed.
            m = linear_probe(
                tr_x, tr_y, te_x, te_y, n_cls, self.weight_decays, self.holdout_fraction,
                headline_metric(cfg), self.max_iter, self.seed,
            )
            m["num_samples"] = len(te_y)
            m["skipped"] = len(train.indices) + len(test.indices) - len(tr_y) - len(te_y)
            results[cfg.name] = m
        return results
