"""Readable pure-PyTorch Bi-WKV (docs/bi_wkv.md): two RWKV-6 scans with an N×N state.

This is the trusted, slow baseline. Autograd differentiates straight through the
loop, so it stores one N×N state per token and direction (that is exactly what the
C++/CUDA kernels avoid). Use it for testing and on devices without a kernel.
"""
from __future__ import annotations

import torch


def bi_wkv_reference(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                     u: torch.Tensor) -> torch.Tensor:
    """r, k, v, w: (B, T, H, N); u: (H, N) -> y: (B, T, H, N) in r's dtype.

    y_t = r_t · (S_t + diag(u) k_t v_tᵀ) + r_t · S'_t, where the left state
    S_t = Σ_{s<t} (Π_{m=s+1}^{t-1} d_m) k_s v_sᵀ, the right state S'_t is the mirror
    image (s > t), and d = exp(-exp(w)). Accumulates in fp32 (fp64 for fp64 inputs).
    """
    out_dtype = r.dtype
    cdtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    # (B, T, H, N) -> (B, H, T, N) so a token is indexed by [:, :, t]
    r, k, v, w = (x.to(cdtype).transpose(1, 2) for x in (r, k, v, w))
    u = u.to(cdtype)
    d = torch.exp(-torch.exp(w))  # decay factor in (0, 1)
    B, H, T, N = r.shape

    # Left scan (t ascending): read the state, add the bonus for the token itself, then update.
    S = r.new_zeros(B, H, N, N)  # S[b, h, i, j]: key channel i, value channel j
    left = []
    for t in range(T):
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]  # k_t v_tᵀ
        left.append(torch.einsum("bhi,bhij->bhj", r[:, :, t], S + u[None, :, :, None] * kv))
        S = d[:, :, t, :, None] * S + kv

    # Right scan (t descending): same state update, no bonus.
    S = r.new_zeros(B, H, N, N)
    right = [None] * T
    for t in reversed(range(T)):
        right[t] = torch.einsum("bhi,bhij->bhj", r[:, :, t], S)
        S = d[:, :, t, :, None] * S + k[:, :, t, :, None] * v[:, :, t, None, :]

    y = torch.stack(left, dim=2) + torch.stack(right, dim=2)  # (B, H, T, N)
    return y.transpose(1, 2).to(out_dtype)
