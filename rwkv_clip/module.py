"""The CLIP LightningModule: two swappable towers, optional projections, a contrastive loss and the recipe.

    images -> image_encoder -> (proj) -> L2-norm ─┐
                                                  ├─ InfoNCE / SigLIP, gathered over ranks with gradient
    tokens -> text_encoder  -> (proj) -> L2-norm ─┘

The towers are any ``nn.Module`` with ``forward(x) -> (B, width)`` and a ``width`` attribute, chosen in
YAML with ``class_path``/``init_args`` (see ``configs/``). A run can start from released or earlier weights
(``pretrained_path``) and keep either tower fixed (``lock_image`` / ``lock_text``, LiT).
"""

import math
import random
import time
from typing import Literal, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from rwkv_clip.loss import (
    CLIP_LOGIT_SCALE_INIT,
    SIGLIP_LOGIT_BIAS_INIT,
    SIGLIP_LOGIT_SCALE_INIT,
    clip_loss,
    siglip_loss,
)

def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _rng_states(device: torch.device) -> dict:
    """Every global random state (torch CPU and this device's CUDA, Python, NumPy), in types that
    ``torch.load(weights_only=True)`` reads."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    torch_state, cuda_state = _rng_state(device)
    return {"torch": torch_state, "cuda": cuda_state, "python": [version, list(state), gauss],
            "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss]}


def _set_rng_states(states: dict, device: torch.device) -> None:
    cuda_state = states["cuda"] if device.type == "cuda" else None
    _set_rng_state((states["torch"], cuda_state), device)
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = states["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))


class CLIPModule(L.LightningModule):
    """Contrastive image-text training.

    Args:
        image_encoder: image tower, ``(B, 3, H, W) -> (B, width)``.
        text_encoder: text tower, ``(B, L) token ids -> (B, width)``.
        embed_dim: width of the shared embedding. ``None`` (the published RWKV-CLIP) feeds the pooled
            features straight into the loss, which needs both towers to have the same width. An integer adds a
            bias-free linear projection to ``embed_dim`` on each tower.
        loss: ``"infonce"`` (symmetric InfoNCE, CLIP) or ``"siglip"`` (pairwise sigmoid loss).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices only.
        betas: AdamW betas.
        eps: AdamW epsilon.
        scheduler: the learning-rate schedule over the run's optimizer steps, stepped every step.
            ``"cosine"``: linear warm-up from ``lr / warmup_steps`` to ``lr``, then a cosine decay to
            ``lr · min_lr_ratio``. ``"onecycle"``: the published recipe, torch's ``OneCycleLR(max_lr=lr,
            pct_start=warmup)`` with its defaults: a cosine warm-up from ``lr / 25``, a cosine decay to
            ``lr / 25 / 1e4``, and AdamW's β1 cycled from 0.95 down to 0.85 at the peak and back (``betas[0]`` is
            then unused; ``min_lr_ratio`` too).
        warmup: share of the optimizer steps spent warming up (0.1 = 10%).
        min_lr_ratio: the cosine decays to ``lr · min_lr_ratio``.
        max_logit_scale: the logit scale is clamped to ``log(max_logit_scale)`` after every optimizer step.
        micro_batch_size: encode each training batch in chunks of this many samples with cached features
            (docs/training.md): every sample still has the whole batch (of every rank) as negatives, and the gradients
            are those of the whole batch, while the activation memory is that of one chunk. This is how to train
            with a larger contrastive batch than fits in memory: raise ``data.batch_size`` and set this. ``None``
            encodes the batch at once. (``trainer.accumulate_grad_batches`` would shrink the negatives to each
            accumulated batch, so it is refused.)
        compile_towers: compile both towers with ``torch.compile`` when a run starts, in place, so checkpoint
            keys do not change. The Bi-RWKV towers trace through the WKV op without a graph break, and the
            elementwise work around the matmuls gets fused; the first steps take longer (compilation).
        tokenizer: the model's tokenizer, kept with it so a checkpoint says how to tokenize: a ``tokenizer.json``
            path, a CLIP merges path (``bpe_simple_vocab_16e6.txt.gz``), or ``"clip"`` (CLIP's BPE from the installed
            open_clip package). See :meth:`get_tokenizer`.
        pretrained_path: weights to start from when ``fit`` starts: a checkpoint of this project or an official
            RWKV-CLIP file (``model_31.pt``). Not a resume: the optimizer, the schedule and the step count start
            fresh (resume with ``--ckpt_path``, which then takes precedence). The towers must match the weights.
        lock_image: keep the image tower fixed (LiT): no gradients, left out of the optimizer, and in eval mode
            (norm statistics, dropout and drop path as at inference) throughout training.
        lock_text: the same for the text tower.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        embed_dim: Optional[int] = None,
        loss: Literal["infonce", "siglip"] = "infonce",
        lr: float = 1e-3,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        scheduler: Literal["cosine", "onecycle"] = "cosine",
        warmup: float = 0.1,
        min_lr_ratio: float = 0.0,
        max_logit_scale: float = 100.0,
        micro_batch_size: Optional[int] = None,
        compile_towers: bool = False,
        tokenizer: Optional[str] = None,
        pretrained_path: Optional[str] = None,
        lock_image: bool = False,
        lock_text: bool = False,
    ):
        super().__init__()
        for name, encoder in (("image_encoder", image_encoder), ("text_encoder", text_encoder)):
            if not isinstance(getattr(encoder, "width", None), int):
                raise ValueError(
                    f"{name} ({type(encoder).__name__}) must have an integer `width` attribute giving the size of "
                    "its pooled features; every tower in rwkv_clip.backbones has one."
                )
        if embed_dim is None and image_encoder.width != text_encoder.width:
            raise ValueError(
                f"The image tower's width ({image_encoder.width}) differs from the text tower's "
                f"({text_encoder.width}): set model.init_args.embed_dim to project both to a shared width."
            )
        if embed_dim is not None and embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive integer or null, got {embed_dim}")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup is the share of steps spent warming up, in [0, 1); got {warmup}")
        if loss not in ("infonce", "siglip"):
            raise ValueError(f"loss must be 'infonce' or 'siglip', got {loss!r}")
        if scheduler not in ("cosine", "onecycle"):
            raise ValueError(f"scheduler must be 'cosine' or 'onecycle', got {scheduler!r}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive integer or null, got {micro_batch_size}")
        if lock_image and lock_text and embed_dim is None:
            raise ValueError("lock_image and lock_text together leave only the logit scale to train: set embed_dim "
                             "to train projections on top of the locked towers, or unlock one tower")

        # Under LightningCLI the towers' class_path/init_args land in the hyperparameters as plain data, which
        # is what lets `load_model` rebuild the model from a checkpoint loaded with weights_only=True. Towers
        # built in Python are modules, not data, so they are left out (pass them to load_model yourself).
        built_by_cli = _given_hyperparameters.get() is not None
        ignore = [] if built_by_cli else ["image_encoder", "text_encoder"]
        if tokenizer is None:  # Lightning refuses a model and a datamodule `tokenizer` hparam that differ
            ignore.append("tokenizer")
        self.save_hyperparameters(ignore=ignore)
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.embed_dim = embed_dim if embed_dim is not None else image_encoder.width
        self.image_projection = nn.Linear(image_encoder.width, embed_dim, bias=False) if embed_dim else nn.Identity()
        self.text_projection = nn.Linear(text_encoder.width, embed_dim, bias=False) if embed_dim else nn.Identity()
        for proj in (self.image_projection, self.text_projection):
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, std=proj.in_features**-0.5)

        self.loss_name = loss
        init_scale = CLIP_LOGIT_SCALE_INIT if loss == "infonce" else SIGLIP_LOGIT_SCALE_INIT
        self.logit_scale = nn.Parameter(torch.tensor(init_scale))
        self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_LOGIT_BIAS_INIT)) if loss == "siglip" else None
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        self.scheduler_name, self.warmup, self.min_lr_ratio = scheduler, warmup, min_lr_ratio
        self.max_log_logit_scale = math.log(max_logit_scale)
        self.micro_batch_size = micro_batch_size
        self._grads_zeroed_in_step = False
        self.compile_towers = compile_towers
        self._last_step_time: Optional[float] = None
        self._total_steps: Optional[int] = None  # the schedule's length, kept in checkpoints (_schedule_length)
        self._rng_to_restore: Optional[dict] = None

        self.tokenizer_spec = tokenizer  # a path or "clip"; get_tokenizer() builds it on first use
        self._tokenizer = None
        self.pretrained_path = pretrained_path
        self.lock_image, self.lock_text = lock_image, lock_text
        for tower in self._locked_towers():
            tower.requires_grad_(False)
        self.train()  # puts the locked towers in eval mode

    # ------------------------------------------------------------------ tokenizer, preprocessing, weights
    def get_tokenizer(self):
        """The model's :class:`~rwkv_clip.tokenizer.Tokenizer`, padding to the text tower's ``context_length``."""
        if self._tokenizer is None:
            if self.tokenizer_spec is None:
                raise ValueError(
                    "this model has no tokenizer: set model.init_args.tokenizer (a tokenizer.json, CLIP's merges "
                    "file, or 'clip'), or pass tokenizer=... to load_model"
                )
            from rwkv_clip.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.load(self.tokenizer_spec, getattr(self.text_encoder, "context_length", 77))
        return self._tokenizer

    def get_preprocess(self):
        """CLIP's eval transform for PIL images at the image tower's training size: bicubic resize of the short
        side, centre crop, CLIP mean/std."""
        from rwkv_clip.datamodules.image_text import eval_transform

        size = getattr(self.image_encoder, "img_size", None)
        if not isinstance(size, int):
            raise ValueError(f"the image tower ({type(self.image_encoder).__name__}) has no integer `img_size`, the "
                             "resolution it was trained at; build the transform with "
                             "rwkv_clip.datamodules.eval_transform(size)")
        return eval_transform(size)

    def load_pretrained(self, path: str) -> None:
        """Copy the weights of a checkpoint (ours or an official RWKV-CLIP file) into this model, strictly."""
        from rwkv_clip.inference import load_weights, read_weights

        with torch.no_grad():
            load_weights(self, read_weights(path), path)

    def _locked_towers(self) -> list[nn.Module]:
        return [t for t, locked in ((self.image_encoder, self.lock_image), (self.text_encoder, self.lock_text)) if locked]

    def train(self, mode: bool = True):
        super().train(mode)
        for tower in self._locked_towers():  # Lightning switches modes around validation: keep these in eval
            tower.eval()
        return self

    # ----------------------------------------------------------------------------------------- inference
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(B, embed_dim)``."""
        return F.normalize(self.image_projection(self.image_encoder(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings ``(B, embed_dim)`` of right-padded token ids ``(B, L)``."""
        return F.normalize(self.text_projection(self.text_encoder(tokens)), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)

    # ------------------------------------------------------------------------------------------ training
    def _gather(self, x: torch.Tensor, sync_grads: bool) -> torch.Tensor:
        """Every rank's rows, concatenated in rank order, with gradient flowing back to their owners."""
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self.all_gather(x, sync_grads=sync_grads).flatten(0, 1)

    def contrastive_loss(self, image_features: torch.Tensor, text_features: torch.Tensor, sync_grads: bool = True):
        rank = 0 if self._trainer is None else self.trainer.global_rank
        all_text = self._gather(text_features, sync_grads)
        if self.loss_name == "siglip":
            return siglip_loss(image_features, all_text, self.logit_scale, self.logit_bias, rank)
        all_image = self._gather(image_features, sync_grads)
        return clip_loss(image_features, text_features, all_image, all_text, self.logit_scale, rank)

    def _check_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("CLIPModule expects batches of (images, token_ids); got " f"{type(batch).__name__}")
        images, tokens = batch
        if images.dim() != 4 or tokens.dim() != 2 or images.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"expected images (B, 3, H, W) and token_ids (B, L) with the same B, got {tuple(images.shape)} "
                f"and {tuple(tokens.shape)}"
            )
        return images, tokens

    def training_step(self, batch, batch_idx):
        images, tokens = self._check_batch(batch)
        if self.micro_batch_size is not None and images.shape[0] > self.micro_batch_size:
            loss = self._cached_feature_loss(images, tokens)
        else:
            loss = self.contrastive_loss(*self(images, tokens), sync_grads=True)

        now = time.perf_counter()
        if self._last_step_time is not None:
            samples = images.shape[0] * self.trainer.world_size
            self.log("train/samples_per_s", samples / (now - self._last_step_time), on_step=True, rank_zero_only=True)
        self._last_step_time = now
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        self.log("train/logit_scale", self.logit_scale.exp(), on_step=True, batch_size=images.shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, batch_size=images.shape[0])
        return loss

    def _cached_feature_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The batch's loss, encoded in chunks of ``micro_batch_size`` with cached features (GradCache).

        1. Encode every chunk without grad, noting the RNG state before each (drop path must replay).
        2. The loss on all the cached features gives the gradient of the loss wrt every feature.
        3. Encode each chunk again, with grad and its RNG state, and backpropagate its rows of that gradient.

        The parameter gradients then equal those of encoding the whole batch at once. All chunks but the last
        are backpropagated here, inside the step: Lightning (and DDP) do not expect gradients yet, so DDP only
        accumulates them locally, as under ``no_sync``. The last chunk's backward is folded into the returned
        loss, so Lightning's own backward, and DDP's all-reduce of the accumulated gradients, run as usual.
        """
        if self._trainer is not None and self.trainer.precision == "16-mixed":  # the chunks backpropagated here would miss the loss scaling
            raise ValueError("model.micro_batch_size does not support trainer.precision=16-mixed (fp16 loss "
                             "scaling); use bf16-mixed or 32-true")
        chunks = list(zip(images.split(self.micro_batch_size), tokens.split(self.micro_batch_size)))
        device = images.device
        # Lightning zeroes the gradients between training_step and its backward, which would drop the chunks
        # backpropagated here: zero them now instead, and skip that one zero_grad (see optimizer_zero_grad).
        self.zero_grad(set_to_none=True)
        self._grads_zeroed_in_step = True
        rng_states, image_parts, text_parts = [], [], []
        with torch.no_grad():
            for chunk_images, chunk_tokens in chunks:
                rng_states.append(_rng_state(device))
                image_part, text_part = self(chunk_images, chunk_tokens)
                image_parts.append(image_part)
                text_parts.append(text_part)
        image_features = torch.cat(image_parts).requires_grad_()
        text_features = torch.cat(text_parts).requires_grad_()
        loss = self.contrastive_loss(image_features, text_features, sync_grads=True)
        # retain_graph: Lightning backpropagates `loss` once more below, for the logit scale (and bias).
        grad_image, grad_text = torch.autograd.grad(loss, (image_features, text_features), retain_graph=True)

        grads = zip(grad_image.split(self.micro_batch_size), grad_text.split(self.micro_batch_size))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # RNG goes on as after 1.
            for i, ((chunk_images, chunk_tokens), state, (gi, gt)) in enumerate(zip(chunks, rng_states, grads)):
                _set_rng_state(state, device)
                image_part, text_part = self(chunk_images, chunk_tokens)
                surrogate = (image_part * gi).sum() + (text_part * gt).sum()  # its gradient is the chunk's share
                if i < len(chunks) - 1:
                    surrogate.backward()
        # Value: the loss. Gradient: the logit scale's through `loss`, the last chunk's through `surrogate`.
        return loss + (surrogate - surrogate.detach())

    def configure_model(self):
        if self.compile_towers:  # nn.Module.compile: in place, and idempotent (Lightning calls this per stage)
            self.image_encoder.compile()
            self.text_encoder.compile()

    def on_fit_start(self):
        # After any --ckpt_path restore (which sets trainer.ckpt_path): a resumed run keeps its own weights.
        if self.pretrained_path is not None and self.trainer.ckpt_path is None:
            self.load_pretrained(self.pretrained_path)
        if self.trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches} would give each "
                "accumulated batch only its own negatives, which changes what a contrastive loss learns. Set "
                "data.batch_size to the whole batch instead, and model.micro_batch_size to what fits in memory: "
                "the batch is then encoded in chunks with cached features, every sample keeps the whole batch as "
                "negatives, and the gradients are exact."
            )

    def on_train_start(self):
        planned = self.trainer.estimated_stepping_batches  # the loader exists by now: nothing is rebuilt
        if self._total_steps is not None and planned != float("inf") and int(planned) != self._total_steps:
            rank_zero_warn(
                f"this run is set to {int(planned)} optimizer steps, but the learning-rate schedule it resumes spans "
                f"{self._total_steps}; the schedule is kept as it was planned"
                + (" (onecycle cannot step past its end: the run will stop with an error there)."
                   if self.scheduler_name == "onecycle" else " (past its end the rate stays at its final value)."))

    def on_train_epoch_start(self):
        self._last_step_time = None  # the gap across an epoch boundary (evaluation) is not training throughput

    def validation_step(self, batch, batch_idx):
        # Each rank scores its own batch, with no collective per batch: ranks may hold different numbers of
        # validation batches (an odd-sized set), and a gather in one rank's extra step would wait forever for the
        # others. The loss is therefore that of val_batch_size pairs whatever the number of devices; Lightning
        # averages it over all ranks' samples once, at the end of the epoch.
        images, tokens = self._check_batch(batch)
        image_features, text_features = self(images, tokens)
        if self.loss_name == "siglip":
            loss = siglip_loss(image_features, text_features, self.logit_scale, self.logit_bias)
        else:
            loss = clip_loss(image_features, text_features, image_features, text_features, self.logit_scale)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=images.shape[0])
        return loss

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        if self._grads_zeroed_in_step:  # a micro-batched step has zeroed them and accumulated its chunks since
            self._grads_zeroed_in_step = False
            return
        optimizer.zero_grad()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)
        # CLIP's clamp: an unbounded temperature makes the loss unstable.
        with torch.no_grad():
            self.logit_scale.clamp_(max=self.max_log_logit_scale)

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: weight decay on matrices only.

        Vectors and scalars (biases, norm gains, the temperature and bias of the loss) never decay. Neither do the
        parameters a tower names in ``no_weight_decay()`` (timm's convention): position embeddings, learned tokens,
        and RWKV's mixing coefficients, decay and bonus, which are vectors stored with extra dimensions. Fixed
        parameters (a locked tower) stay out of the optimizer.
        """
        no_decay_names = set()
        for prefix, module in self.named_modules():
            if module is not self and callable(getattr(module, "no_weight_decay", None)):
                no_decay_names |= {f"{prefix}.{name}" for name in module.no_weight_decay()}
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            spared = param.ndim < 2 or name in no_decay_names
            (no_decay if spared else decay).append(param)
        return [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.lr, betas=self.betas, eps=self.eps)
        total_steps = self._schedule_length()
        if self.scheduler_name == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=self.lr, total_steps=total_steps, pct_start=float(self.warmup))
        else:
            warmup_steps = int(self.warmup * total_steps)

            def lr_factor(step: int) -> float:
                if step < warmup_steps:
                    return (step + 1) / warmup_steps
                progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
                return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule_length(self) -> int:
        """The number of optimizer steps the schedule spans.

        A fresh run asks the trainer, which builds the training loader to count its batches. A resumed run must
        not: configure_optimizers runs before the trainer restores the loops from the checkpoint, and a loader
        built this early is never given its saved position (Lightning issue #20550), so the run would restart
        the epoch's data from its first batch. It takes the length saved in the checkpoint instead, which also
        keeps the schedule of the run it continues.
        """
        if self.trainer.ckpt_path is None:  # a new run (weights from load_from_checkpoint, if any, are just weights)
            self._total_steps = self._rng_to_restore = None
        if self._total_steps is None:
            if self.trainer.ckpt_path is not None:
                rank_zero_warn(
                    f"the checkpoint {self.trainer.ckpt_path} records no schedule length (an older version wrote it): "
                    "the run resumes, but its data restarts at the first batch of the epoch instead of where it "
                    "stopped.")
            steps = self.trainer.estimated_stepping_batches
            if steps == float("inf"):
                raise ValueError("the learning-rate schedule needs a finite run: set trainer.max_epochs or "
                                 "trainer.max_steps")
            self._total_steps = max(1, int(steps))
        return self._total_steps

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Resuming must continue the same run: the schedule's length (see _schedule_length), and the random
        # state of every generator the model draws from (drop path), as it is after this step. The data path
        # needs none: shuffling, text choice and augmentation are seeded by (seed, epoch, sample).
        checkpoint["rwkv_clip"] = {"total_steps": self._total_steps, "rng": _rng_states(self.device)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting and self.trainer.strategy.restore_checkpoint_after_setup:
            rank_zero_warn(
                f"{type(self.trainer.strategy).__name__} restores checkpoints after configure_optimizers, which has "
                "built the training loader by then: the run resumes, but its data restarts at the first batch of "
                "the epoch instead of where it stopped.")
        saved = checkpoint.get("rwkv_clip", {})
        self._total_steps = saved.get("total_steps")
        self._rng_to_restore = saved.get("rng")

    def on_train_batch_start(self, batch, batch_idx):
        # The first step after a resume continues the random streams where the checkpointed step left them.
        # Restored here, after the batch was fetched, because the loader draws its worker seeds from the global
        # generator when it starts, which in the uninterrupted run happened before the checkpoint was written.
        if self._rng_to_restore is not None:
            _set_rng_states(self._rng_to_restore, self.device)
            self._rng_to_restore = None
