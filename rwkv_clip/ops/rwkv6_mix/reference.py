"""Readable RWKV-6 mixing maths in plain PyTorch: the trusted baseline of the fused versions in fused.py.

Autograd differentiates straight through these, so it keeps every intermediate that some backward formula
reads: the shifted tokens, each lerp, each low-rank mix, the GroupNorm's input and output, the gate before
and after its SiLU, the squared ReLU... (the fused versions keep a few of these and recompute the rest).

Shapes: x and its token-shifted copy sx are (B, T, C); every ``maa_*`` / ``decay`` vector is (1, 1, C);
matrices are stored as nn.Linear weights (out, in).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def time_mix_inputs_reference(x: Tensor, sx: Tensor, maa_x: Tensor, maa_wkvrg: tuple[Tensor, ...], maa_w1: Tensor,
                              maa_w2: Tensor, decay: Tensor, decay_w1: Tensor, decay_w2: Tensor, W_r: Tensor,
                              W_k: Tensor, W_v: Tensor, W_g: Tensor) -> tuple[Tensor, ...]:
    """The inputs of the Bi-WKV scan from the tokens ``x`` and their shifted neighbours ``sx``.

    RWKV-6's data-dependent lerp: a low-rank map of one static lerp of ``x`` and ``sx`` (rank D, ``maa_w1``:
    (C, 5*D), ``maa_w2``: (5, D, C)) offsets the static lerp weights ``maa_wkvrg`` = (w, k, v, r, g) per token;
    then the projections. Returns (r, k, v, gate before its SiLU, decay logit w).
    """
    B, T, C = x.shape
    xx = sx - x
    m = torch.tanh((x + xx * maa_x) @ maa_w1).view(B, T, 5, -1)
    mw, mk, mv, mr, mg = torch.einsum("btfd,fdc->fbtc", m, maa_w2).unbind(0)
    maa_w, maa_k, maa_v, maa_r, maa_g = maa_wkvrg
    xw = x + xx * (maa_w + mw)
    xk = x + xx * (maa_k + mk)
    xv = x + xx * (maa_v + mv)
    xr = x + xx * (maa_r + mr)
    xg = x + xx * (maa_g + mg)
    r, k, v, g = F.linear(xr, W_r), F.linear(xk, W_k), F.linear(xv, W_v), F.linear(xg, W_g)
    w = decay + torch.tanh(xw @ decay_w1) @ decay_w2
    return r, k, v, g, w


def gated_group_norm_reference(y: Tensor, gate: Tensor, gn_weight: Tensor, gn_bias: Tensor, groups: int,
                               eps: float, W_o: Tensor) -> Tensor:
    """The time mix's output: GroupNorm (one group per head) of the scan's ``y`` (B, T, C), times
    ``silu(gate)``, through the output projection ``W_o``."""
    B, T, C = y.shape
    y = F.group_norm(y.reshape(B * T, C), groups, gn_weight, gn_bias, eps).view(B, T, C)
    return F.linear(y * F.silu(gate), W_o)


def channel_mix_reference(x: Tensor, sx: Tensor, maa_k: Tensor, maa_r: Tensor, W_k: Tensor, W_r: Tensor,
                          W_v: Tensor, static_mix: bool) -> Tensor:
    """RWKV channel mixing ``sigmoid(W_r x_r) * W_v relu(W_k x_k)^2`` of tokens ``x`` and neighbours ``sx``.

    ``static_mix=True`` (Vision-RWKV): ``x_* = x*mu + sx*(1-mu)``; ``False`` (RWKV-LM): ``x_* = x + (sx-x)*mu``.
    """
    if static_mix:
        xk = x * maa_k + sx * (1.0 - maa_k)
        xr = x * maa_r + sx * (1.0 - maa_r)
    else:
        xk = x + (sx - x) * maa_k
        xr = x + (sx - x) * maa_r
    k = torch.relu(F.linear(xk, W_k)).square()
    return torch.sigmoid(F.linear(xr, W_r)) * F.linear(k, W_v)
