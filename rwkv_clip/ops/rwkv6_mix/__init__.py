"""RWKV-6 mixing around the Bi-WKV scan: the time mix's inputs and output, and the channel mix.

Two implementations of the same maths: ``reference.py`` (plain PyTorch; autograd keeps every intermediate)
and ``fused.py`` (autograd Functions that keep a few tensors and recompute the elementwise rest in backward,
so a tower keeps far fewer activation bytes). The functions below run the fused ones; set
``rwkv_clip.ops.rwkv6_mix.FUSED = False`` (or pass ``fused=False``) to run the reference instead.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from .fused import ChannelMix, GatedGroupNorm, TimeMixInputs
from .reference import channel_mix_reference, gated_group_norm_reference, time_mix_inputs_reference

FUSED = True

Shift = Callable[[Tensor], Tensor]


def _use_fused(fused: Optional[bool]) -> bool:
    return FUSED if fused is None else fused


def time_mix_inputs(x: Tensor, shift: Shift, maa_x: Tensor, maa_wkvrg: tuple[Tensor, ...], maa_w1: Tensor,
                    maa_w2: Tensor, decay: Tensor, decay_w1: Tensor, decay_w2: Tensor, W_r: Tensor, W_k: Tensor,
                    W_v: Tensor, W_g: Tensor, fused: Optional[bool] = None) -> tuple[Tensor, ...]:
    """(r, k, v, gate before SiLU, decay logit w) of tokens ``x`` (B, T, C); see time_mix_inputs_reference."""
    sx = shift(x)
    if not _use_fused(fused):
        return time_mix_inputs_reference(x, sx, maa_x, maa_wkvrg, maa_w1, maa_w2, decay, decay_w1, decay_w2,
                                         W_r, W_k, W_v, W_g)
    return TimeMixInputs.apply(x, sx, shift, maa_x, *maa_wkvrg, maa_w1, maa_w2, decay, decay_w1, decay_w2,
                               W_r, W_k, W_v, W_g)


def gated_group_norm(y: Tensor, gate: Tensor, gn_weight: Tensor, gn_bias: Tensor, groups: int, eps: float,
                     W_o: Tensor, fused: Optional[bool] = None) -> Tensor:
    """``W_o (GroupNorm(y) * silu(gate))``; see gated_group_norm_reference."""
    if not _use_fused(fused):
        return gated_group_norm_reference(y, gate, gn_weight, gn_bias, groups, eps, W_o)
    return GatedGroupNorm.apply(y, gate, gn_weight, gn_bias, groups, eps, W_o)


def channel_mix(x: Tensor, shift: Shift, maa_k: Tensor, maa_r: Tensor, W_k: Tensor, W_r: Tensor, W_v: Tensor,
                static_mix: bool, fused: Optional[bool] = None) -> Tensor:
    """``sigmoid(W_r x_r) * W_v relu(W_k x_k)^2``; see channel_mix_reference."""
    sx = shift(x)
    if not _use_fused(fused):
        return channel_mix_reference(x, sx, maa_k, maa_r, W_k, W_r, W_v, static_mix)
    return ChannelMix.apply(x, sx, shift, maa_k, maa_r, W_k, W_r, W_v, static_mix)


__all__ = ["FUSED", "channel_mix", "channel_mix_reference", "gated_group_norm", "gated_group_norm_reference",
           "time_mix_inputs", "time_mix_inputs_reference"]
