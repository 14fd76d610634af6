"""CLIP-style Transformer text tower, the baseline the RWKV text tower is compared against.

Token + learned position embedding, pre-LN residual attention blocks, a final LayerNorm, then either
CLIP's end-of-text pooling under a causal mask, or bidirectional attention with masked mean pooling.
"""

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rwkv_clip.backbones.utils import padding_mask


class Attention(nn.Module):
    def __init__(self, *, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    """Pre-LN residual attention block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, *, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width=width, heads=heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """CLIP text Transformer returning pooled features ``(B, width)`` (not normalised, not projected).

    Args:
        vocab_size, context_length: tokenizer vocabulary and the longest token sequence (position embedding size).
        width, layers, heads, mlp_ratio: Transformer size (CLIP B/32: 512, 12, 8, 4.0).
        causal: causal attention (CLIP) or bidirectional.
        pooling: ``"eot"`` takes the last real token (CLIP's end-of-text token), ``"mean"`` averages the real tokens.
        pad_id: id of the right padding; real tokens are everything up to the last non-pad token.
        grad_checkpointing: recompute block activations in the backward pass to save memory.
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        layers: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        causal: bool = True,
        pooling: Literal["eot", "mean"] = "eot",
        pad_id: int = 0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"TextTransformer: width ({width}) must be divisible by heads ({heads})")
        if pooling not in ("eot", "mean"):
            raise ValueError(f"TextTransformer: pooling must be 'eot' or 'mean', got {pooling!r}")
        if vocab_size < 1 or context_length < 1 or layers < 1:
            raise ValueError(
                f"TextTransformer: vocab_size, context_length and layers must be positive, "
                f"got {vocab_size}, {context_length}, {layers}"
            )
        self.vocab_size, self.context_length, self.pad_id = vocab_size, context_length, pad_id
        self.width, self.layers, self.heads = width, layers, heads
        self.causal, self.pooling, self.grad_checkpointing = causal, pooling, False
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList([Block(width=width, heads=heads, mlp_ratio=mlp_ratio) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.init_parameters()
        self.set_grad_checkpointing(grad_checkpointing)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that get no weight decay (timm's convention): the position embedding."""
        return {"positional_embedding"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations."""
        self.grad_checkpointing = enable

    @torch.no_grad()
    def init_parameters(self) -> None:
        # CLIP's scheme: residual-branch outputs scaled down by sqrt(2 * layers) so the stream's variance stays bounded.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = self.width ** -0.5
        proj_std = self.width ** -0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp[0].weight, std=fc_std)
            nn.init.normal_(block.mlp[2].weight, std=proj_std)
            for lin in (block.attn.qkv, block.attn.proj, block.mlp[0], block.mlp[2]):
                nn.init.zeros_(lin.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"TextTransformer expects integer token ids (B, L), got {tuple(tokens.shape)} {tokens.dtype}")
        B, L = tokens.shape
        if L > self.context_length:
            raise ValueError(
                f"TextTransformer: {L} tokens exceed context_length={self.context_length}; "
                f"tokenize with context_length<={self.context_length} or raise context_length"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"TextTransformer: token ids must lie in [0, {self.vocab_size}) (vocab_size)")
        real = padding_mask(tokens, self.pad_id)  # (B, L), True = real token
        # An all-pad row would leave a query with no key (NaN); let it see position 0 instead.
        real[:, 0] = True

        if self.causal:
            # Right padding + causal mask: a real token only sees earlier tokens, all real, so pads never leak in.
            attn_mask, is_causal = None, True
        else:
            attn_mask, is_causal = real[:, None, None, :], False  # key padding mask, broadcast over heads and queries

        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
            else:
                x = block(x, attn_mask, is_causal)
        x = self.ln_final(x)

        if self.pooling == "eot":
            # End-of-text = last real token; its position comes from the mask, not argmax of ids.
            last = real.sum(dim=1) - 1
            return x[torch.arange(B, device=x.device), last]
        weights = real.to(x.dtype).unsqueeze(-1)
        return (x * weights).sum(dim=1) / weights.sum(dim=1)
