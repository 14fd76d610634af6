"""Bidirectional RWKV-6 towers of RWKV-CLIP: ``VisionRWKV`` for images and ``TextRWKV`` for captions.

Both towers stack the same pre-norm residual block (docs/model.md):

    x = x + DropPath(SpatialMix(ln1(x)));  x = x + DropPath(ChannelMix(ln2(x)))

with one extra LayerNorm ``ln0`` in front of block 0 and a final ``ln_out``. What differs between the
towers is only the *token shift* that hands each token some channels of its neighbours (Q-Shift on the
image patch grid, B-Shift along the caption) and the channel-mix interpolation style. Each block gets
the shift as a plain callable, so one SpatialMix / ChannelMix / Block serves both towers.

Parameter names follow RWKV-LM v6 (``blocks.N.att.time_maa_x``, ``blocks.N.ffn.key``, ``emb``,
``ln_out``...), so converting the published checkpoints is a key rename away. Both towers have timm's small
interface: ``no_weight_decay()`` names the mixing / decay / bonus vectors (all called ``time_*``) and the position
embedding, and ``set_grad_checkpointing()`` switches block recomputation on or off.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, resample_abs_pos_embed
from torch.utils.checkpoint import checkpoint

from rwkv_clip.backbones.utils import padding_mask
from rwkv_clip.ops import bi_wkv, rwkv6_mix

TIME_MIX_EXTRA_DIM = 32  # rank of the data-dependent lerp (A1: C -> 5*32, A2: 5 x (32 -> C))
TIME_DECAY_EXTRA_DIM = 64  # rank of the data-dependent decay (D1: C -> 64, D2: 64 -> C)

Shift = Callable[[torch.Tensor], torch.Tensor]  # (B, T, C) -> (B, T, C)
WKVBackend = Literal["auto", "reference", "cpu", "cuda"]  # see rwkv_clip.ops.bi_wkv


# ----------------------------------------------------------------------------------------------------
# Token shifts


def q_shift(x: torch.Tensor, grid: tuple[int, int], head_size: int) -> torch.Tensor:
    """Q-Shift for patch tokens ``x`` (B, h*w, C) laid out row-major on a ``grid`` = (h, w).

    Within each head the ``head_size`` channels split into four quarters, taken from the patch to the
    left, to the right, above and below. Patches on the border get zeros from outside the grid.
    """
    B, T, C = x.shape
    h, w = grid
    x = x.view(B, h, w, C // head_size, 4, head_size // 4)
    out = torch.zeros_like(x)
    out[:, :, 1:, :, 0] = x[:, :, :-1, :, 0]  # quarter 0 from the left neighbour
    out[:, :, :-1, :, 1] = x[:, :, 1:, :, 1]  # quarter 1 from the right neighbour
    out[:, 1:, :, :, 2] = x[:, :-1, :, :, 2]  # quarter 2 from the neighbour above
    out[:, :-1, :, :, 3] = x[:, 1:, :, :, 3]  # quarter 3 from the neighbour below
    return out.view(B, T, C)


def b_shift(x: torch.Tensor, head_size: int) -> torch.Tensor:
    """B-Shift for a token sequence ``x`` (B, T, C): within each head the first half of the channels
    comes from the previous token and the second half from the next one (zeros past either end)."""
    B, T, C = x.shape
    x = x.view(B, T, C // head_size, 2, head_size // 2)
    out = torch.zeros_like(x)
    out[:, 1:, :, 0] = x[:, :-1, :, 0]  # first half from the previous token
    out[:, :-1, :, 1] = x[:, 1:, :, 1]  # second half from the next token
    return out.view(B, T, C)


# ----------------------------------------------------------------------------------------------------
# RWKV-6 layers, shared by both towers


class SpatialMix(nn.Module):
    """RWKV-6 time mixing with a data-dependent lerp and the bidirectional WKV scan (docs/model.md)."""

    def __init__(
        self, dim: int, head_size: int, layer_id: int, n_layer: int, ln_x_eps: float, wkv_backend: str
    ):
        super().__init__()
        if dim % head_size != 0:
            raise ValueError(f"width ({dim}) must be a multiple of head_size ({head_size})")
        self.head_size = head_size
        self.n_head = dim // head_size
        self.wkv_backend = wkv_backend

        # RWKV-6 "fancy" init: early layers and low channels lean on the neighbours, later ones on x.
        r01 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0  # 0 -> 1 over the layers
        r10 = 1.0 - layer_id / n_layer  # 1 -> ~0 over the layers
        ddd = (torch.arange(dim, dtype=torch.float32) / dim).view(1, 1, dim)
        self.time_maa_x = nn.Parameter(1.0 - ddd.pow(r10))
        self.time_maa_w = nn.Parameter(1.0 - ddd.pow(r10))
        self.time_maa_k = nn.Parameter(1.0 - ddd.pow(r10))
        self.time_maa_v = nn.Parameter(1.0 - (ddd.pow(r10) + 0.3 * r01))
        self.time_maa_r = nn.Parameter(1.0 - ddd.pow(0.5 * r10))
        self.time_maa_g = nn.Parameter(1.0 - ddd.pow(0.5 * r10))
        # Low-rank data-dependent lerp offsets for w, k, v, r, g: near zero, so the lerp starts static.
        self.time_maa_w1 = nn.Parameter(torch.empty(dim, 5 * TIME_MIX_EXTRA_DIM).uniform_(-1e-4, 1e-4))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, TIME_MIX_EXTRA_DIM, dim).uniform_(-1e-4, 1e-4))

        # Decay logits w0 (decay = exp(-exp(w))): from slow (-6) to fast (-1) across the channels.
        n = torch.arange(dim, dtype=torch.float32) / max(dim - 1, 1)
        self.time_decay = nn.Parameter((-6.0 + 5.0 * n.pow(0.7 + 1.3 * r01)).view(1, 1, dim))
        self.time_decay_w1 = nn.Parameter(torch.empty(dim, TIME_DECAY_EXTRA_DIM).uniform_(-1e-4, 1e-4))
        self.time_decay_w2 = nn.Parameter(torch.empty(TIME_DECAY_EXTRA_DIM, dim).uniform_(-1e-4, 1e-4))
        # Bonus u for the token itself, with a small zigzag across channels.
        zigzag = ((torch.arange(dim) + 1) % 3 - 1).float() * 0.1
        self.time_faaaa = nn.Parameter((r01 * (1.0 - n) + zigzag).view(self.n_head, head_size))

        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)
        self.ln_x = nn.GroupNorm(self.n_head, dim, eps=ln_x_eps)

    def forward(self, x: torch.Tensor, shift: Shift, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, C = x.shape
        H, N = self.n_head, self.head_size

        # Data-dependent lerp between each token and its shifted neighbours, then the projections.
        r, k, v, g, w = rwkv6_mix.time_mix_inputs(
            x, shift, self.time_maa_x,
            (self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g),
            self.time_maa_w1, self.time_maa_w2, self.time_decay, self.time_decay_w1, self.time_decay_w2,
            self.receptance.weight, self.key.weight, self.value.weight, self.gate.weight,
        )
        if key_mask is not None:  # a key of zero adds nothing to either scan's state: pads stay silent
            k = k * key_mask

        # r, k, v share a dtype (bf16 under autocast); w stays fp32 (time_decay is fp32): it sits inside
        # exp(-exp(w)), where bf16 rounding would visibly change the decay. The scan accumulates in fp32.
        k, v = k.to(r.dtype), v.to(r.dtype)
        y = bi_wkv(
            r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N), w.view(B, T, H, N), self.time_faaaa,
            backend=self.wkv_backend,
        )
        # GroupNorm per head, times silu(g), through the output projection.
        return rwkv6_mix.gated_group_norm(y.reshape(B, T, C), g, self.ln_x.weight, self.ln_x.bias, H,
                                          self.ln_x.eps, self.output.weight)


class ChannelMix(nn.Module):
    """RWKV channel mixing: ``sigmoid(W_r x_r) * W_v relu(W_k x_k)^2``.

    ``static_mix=True`` (images, as Vision-RWKV): ``x_* = x*mu + shift(x)*(1-mu)``.
    ``static_mix=False`` (text, as RWKV-LM):       ``x_* = x + (shift(x)-x)*mu``.
    Both start with the same weight on the neighbours, ``1 - (n/C)^(1-l/L)``.
    """

    def __init__(self, dim: int, hidden: int, layer_id: int, n_layer: int, static_mix: bool):
        super().__init__()
        self.static_mix = static_mix
        ddd = (torch.arange(dim, dtype=torch.float32) / dim).view(1, 1, dim)
        shift_weight = 1.0 - ddd.pow(1.0 - layer_id / n_layer)
        mu = 1.0 - shift_weight if static_mix else shift_weight
        self.time_maa_k = nn.Parameter(mu.clone())
        self.time_maa_r = nn.Parameter(mu.clone())
        self.key = nn.Linear(dim, hidden, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, shift: Shift) -> torch.Tensor:
        return rwkv6_mix.channel_mix(x, shift, self.time_maa_k, self.time_maa_r, self.key.weight,
                                     self.receptance.weight, self.value.weight, self.static_mix)


class Block(nn.Module):
    """Pre-norm residual RWKV block; block 0 also owns ``ln0``, applied to the tower's input.

    Args:
        dim: channels C.
        head_size: channels per WKV head.
        hidden: channel-mix hidden width.
        layer_id, n_layer: this block's index and the tower's depth (the RWKV-6 init depends on both).
        drop_path: stochastic depth of both residual branches (timm's ``DropPath``).
        ln_x_eps: epsilon of the GroupNorm after the WKV scan.
        static_ffn_mix: channel-mix interpolation style (see ``ChannelMix``).
        wkv_backend: passed to ``rwkv_clip.ops.bi_wkv``.
    """

    def __init__(
        self,
        *,
        dim: int,
        head_size: int,
        hidden: int,
        layer_id: int,
        n_layer: int,
        drop_path: float = 0.0,
        ln_x_eps: float = 1e-5,
        static_ffn_mix: bool = True,
        wkv_backend: str = "auto",
    ):
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(dim)
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.att = SpatialMix(dim, head_size, layer_id, n_layer, ln_x_eps, wkv_backend)
        self.ffn = ChannelMix(dim, hidden, layer_id, n_layer, static_ffn_mix)
        self.drop_path = DropPath(drop_path)  # a no-op at 0 and in eval mode

    def forward(self, x: torch.Tensor, shift: Shift, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if hasattr(self, "ln0"):
            x = self.ln0(x)
        x = x + self.drop_path(self.att(self.ln1(x), shift, key_mask))
        x = x + self.drop_path(self.ffn(self.ln2(x), shift))
        return x


def _time_vectors(tower: nn.Module) -> set[str]:
    """The RWKV-6 per-channel vectors of ``tower``'s blocks: the token-shift mixing coefficients, the decay and
    the bonus (``time_maa_x``, ``time_decay``, ``time_faaaa``, ...). The low-rank matrices beside them
    (``time_maa_w1``, ``time_decay_w2``, ...) are ordinary weights and decay like any other matrix."""
    return {name for name, _ in tower.named_parameters()
            if name.rpartition(".")[2].startswith("time_") and not name.endswith(("_w1", "_w2"))}


def _run_blocks(tower: nn.Module, x: torch.Tensor, shift: Shift, key_mask: Optional[torch.Tensor] = None):
    for block in tower.blocks:
        if tower.grad_checkpointing and tower.training and torch.is_grad_enabled():
            # Recompute each block in the backward pass; the RNG state is replayed, so drop path matches.
            x = checkpoint(block, x, shift, key_mask, use_reentrant=False)
        else:
            x = block(x, shift, key_mask)
    return x


# ----------------------------------------------------------------------------------------------------
# Towers


class VisionRWKV(nn.Module):
    """Bi-RWKV image tower: patch embedding + position embedding, Q-Shift blocks, mean over patches.

    Args:
        img_size: training resolution; the position embedding is resized bicubically for other sizes.
        patch_size: side of the square patches (the conv stride).
        in_chans: image channels.
        width: channels C of every block (and of the pooled output).
        depth: number of blocks.
        head_size: channels per WKV head (must divide ``width`` and be a multiple of 4 for Q-Shift).
        mlp_ratio: channel-mix hidden width as a multiple of ``width``.
        drop_path_rate: stochastic depth of the last block (linear from 0 at block 0).
        grad_checkpointing: recompute each block in backward to save activation memory.
        wkv_backend: passed to ``rwkv_clip.ops.bi_wkv`` ("auto" picks the fastest available).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 32,
        in_chans: int = 3,
        width: int = 640,
        depth: int = 12,
        head_size: int = 80,
        mlp_ratio: float = 5.0,
        drop_path_rate: float = 0.3,
        grad_checkpointing: bool = False,
        wkv_backend: WKVBackend = "auto",
    ):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        if head_size % 4 != 0:
            raise ValueError(f"head_size ({head_size}) must be a multiple of 4: Q-Shift splits each head in quarters")
        self.width = width
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.head_size = head_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.grad_checkpointing = False

        self.patch_embed = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], width))
        hidden = int(mlp_ratio * width)
        # timm's stochastic-depth schedule, linear from 0 at block 0 to drop_path_rate at the last block.
        dpr = [r.item() for r in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList(
            Block(dim=width, head_size=head_size, hidden=hidden, layer_id=i, n_layer=depth, drop_path=dpr[i],
                  ln_x_eps=1e-5, static_ffn_mix=True, wkv_backend=wkv_backend)
            for i in range(depth)
        )
        self.ln_out = nn.LayerNorm(width)
        self.set_grad_checkpointing(grad_checkpointing)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that get no weight decay (timm's convention): the position embedding and
        every block's mixing coefficients, decay and bonus vectors."""
        return {"pos_embed"} | _time_vectors(self)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations."""
        self.grad_checkpointing = enable

    def resized_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding for a patch ``grid`` (h, w), bicubically resized if it differs."""
        if grid == self.grid:
            return self.pos_embed
        # antialias=False: plain bicubic (a = -0.75), as the published model resizes; timm's default antialiased
        # kernel is a different cubic and would not reproduce its features.
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid), old_size=list(self.grid),
                                      num_prefix_tokens=0, interpolation="bicubic", antialias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"images must have shape (batch, {self.in_chans}, height, width), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image height and width must be multiples of patch_size={self.patch_size}, got {H}x{W}")
        grid = (H // self.patch_size, W // self.patch_size)

        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, h*w, C), row-major patches
        x = x + self.resized_pos_embed(grid)
        x = _run_blocks(self, x, lambda t: q_shift(t, grid, self.head_size))
        return self.ln_out(x).mean(dim=1)  # global average pooling, no class token


class TextRWKV(nn.Module):
    """Bi-RWKV text tower: token embedding (no position embedding), B-Shift blocks, pooled features.

    Captions are right-padded with ``pad_id``. With ``pooling="mean"`` (default) pads are masked out
    everywhere (zeroed before every token shift, zero keys in the scan) and the L2-normalised tokens
    are averaged over the real tokens only, so padding never changes the features. ``pooling="published"``
    reproduces the published model: no masking, and the average runs over every position, pads included.

    Args:
        vocab_size: token vocabulary size.
        context_length: longest accepted token sequence.
        width: channels C.
        depth: number of blocks.
        head_size: channels per WKV head (must divide ``width`` and be even for B-Shift).
        ffn_hidden: channel-mix hidden width (3.5 * width in the published model).
        pad_id: id of the padding token.
        pooling: "mean" (masked, the fix) or "published".
        grad_checkpointing: recompute each block in backward to save activation memory.
        wkv_backend: passed to ``rwkv_clip.ops.bi_wkv``.
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 640,
        depth: int = 6,
        head_size: int = 64,
        ffn_hidden: int = 2240,
        pad_id: int = 0,
        pooling: Literal["mean", "published"] = "mean",
        grad_checkpointing: bool = False,
        wkv_backend: WKVBackend = "auto",
    ):
        super().__init__()
        if pooling not in ("mean", "published"):
            raise ValueError(f"pooling must be 'mean' or 'published', got {pooling!r}")
        if head_size % 2 != 0:
            raise ValueError(f"head_size ({head_size}) must be even: B-Shift splits each head in halves")
        self.width = width
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.head_size = head_size
        self.pad_id = pad_id
        self.pooling = pooling
        self.grad_checkpointing = False

        self.emb = nn.Embedding(vocab_size, width)
        # GroupNorm eps 1e-5 * 64: the published head_size_divisor of 8, squared.
        self.blocks = nn.ModuleList(
            Block(dim=width, head_size=head_size, hidden=ffn_hidden, layer_id=i, n_layer=depth, drop_path=0.0,
                  ln_x_eps=1e-5 * 64, static_ffn_mix=False, wkv_backend=wkv_backend)
            for i in range(depth)
        )
        self.ln_out = nn.LayerNorm(width)
        self._init_weights(depth)
        self.set_grad_checkpointing(grad_checkpointing)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that get no weight decay (timm's convention): every block's mixing
        coefficients, decay and bonus vectors."""
        return _time_vectors(self)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations."""
        self.grad_checkpointing = enable

    @torch.no_grad()
    def _init_weights(self, depth: int) -> None:
        """RWKV-LM v6 init of the matrices (the time_* vectors are set in the layers)."""
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.GroupNorm):  # ln_x gain grows with depth
                layer = int(name.split(".")[1])
                mod.weight.fill_(((1 + layer) / depth) ** 0.7)
            if not isinstance(mod, nn.Linear):
                continue
            out_f, in_f = mod.weight.shape
            gain = math.sqrt(out_f / in_f) if out_f > in_f else 1.0
            scale = {"att.key": 0.1, "att.gate": 0.1, "ffn.key": 0.5}.get(name.split(".", 2)[-1], 1.0)
            if name.endswith(("att.output", "ffn.value", "ffn.receptance")):
                nn.init.zeros_(mod.weight)  # each block starts as the identity
            else:
                nn.init.orthogonal_(mod.weight, gain=gain * scale)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32):
            raise ValueError(f"tokens must be an integer tensor (batch, length), got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens have length {tokens.shape[1]} > context_length={self.context_length}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size}), got "
                             f"[{tokens.min().item()}, {tokens.max().item()}]: tokenizer and vocab_size disagree")
        if self.pooling == "published":
            x = _run_blocks(self, self.emb(tokens), lambda t: b_shift(t, self.head_size))
            return F.normalize(self.ln_out(x), dim=-1).mean(dim=1)

        real = padding_mask(tokens, self.pad_id)
        # Padding changes nothing, so the columns that are padding in every row can be dropped: captions are
        # mostly far shorter than the context, and the cost is linear in the length.
        longest = max(int(real.sum(dim=1).max()), 1)
        tokens, real = tokens[:, :longest], real[:, :longest]
        x = self.emb(tokens)
        real = real.unsqueeze(-1).to(x.dtype)  # (B, T, 1), 1 = real token
        # Zeroing pads before each shift makes the last real token see the same zeros as at the end of an
        # unpadded caption; zero keys keep the backward scan from carrying anything out of the pads.
        x = _run_blocks(self, x, lambda t: b_shift(t * real.to(t.dtype), self.head_size), real)
        x = F.normalize(self.ln_out(x), dim=-1)
        return (x * real).sum(dim=1) / real.sum(dim=1).clamp(min=1.0)
