"""Public bi_wkv(): input validation, backend dispatch and the autograd wrappers of the kernels."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ._build import get_extension
from .reference import bi_wkv_reference

BACKENDS = ("auto", "reference", "cpu", "cuda")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CUDA_MAX_N = 128  # the CUDA kernel holds one state column of up to 128 floats per thread
_warned = False


def _validate(r, k, v, w, u, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"bi_wkv: backend must be one of {BACKENDS}, got {backend!r}")
    for name, x in (("r", r), ("k", k), ("v", v), ("w", w), ("u", u)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"bi_wkv: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"bi_wkv: {name} has dtype {x.dtype}; expected one of float32, bfloat16, float16, "
                             f"float64 (cast it with .float())")
    if r.dim() != 4:
        raise ValueError(f"bi_wkv: r must have shape (B, T, H, N), got {tuple(r.shape)}")
    B, T, H, N = r.shape
    if T < 1 or N < 1 or B < 1 or H < 1:
        raise ValueError(f"bi_wkv: r must have shape (B, T, H, N) with every size >= 1, got {tuple(r.shape)}")
    for name, x in (("k", k), ("v", v), ("w", w)):
        if x.shape != r.shape:
            raise ValueError(f"bi_wkv: {name} must have shape (B, T, H, N) = {tuple(r.shape)} like r, "
                             f"got {tuple(x.shape)}")
    if u.shape != (H, N):
        raise ValueError(f"bi_wkv: u must have shape (H, N) = {(H, N)}, got {tuple(u.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != r.dtype:
            raise ValueError(f"bi_wkv: {name} has dtype {x.dtype} but r has {r.dtype}; r, k and v must share "
                             f"a dtype (w and u may differ)")
    for name, x in (("k", k), ("v", v), ("w", w), ("u", u)):
        if x.device != r.device:
            raise ValueError(f"bi_wkv: {name} is on {x.device} but r is on {r.device}; "
                             f"all inputs must be on one device")
    if backend == "cpu" and r.device.type != "cpu":
        raise ValueError(f"bi_wkv: backend='cpu' needs CPU tensors, got r on {r.device}")
    if backend == "cuda":
        if r.device.type != "cuda":
            raise ValueError(f"bi_wkv: backend='cuda' needs CUDA tensors, got r on {r.device}")
        if r.dtype == torch.float64:
            raise ValueError("bi_wkv: backend='cuda' supports float32, bfloat16 and float16 inputs, got float64")
        if N > CUDA_MAX_N:
            raise ValueError(f"bi_wkv: backend='cuda' supports head size N <= {CUDA_MAX_N} in r of shape "
                             f"(B, T, H, N) = {tuple(r.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bonus_backward(r, k, v, w, u, gy, gr, gk, gv, dgd):
    """Adds the bonus-term gradients and turns d·∂L/∂d into ∂L/∂w (all in the compute dtype)."""
    vg = (v * gy).sum(-1, keepdim=True)  # v_t · gy_t
    gr = gr + u * k * vg
    gk = gk + u * r * vg
    gv = gv + (r * u * k).sum(-1, keepdim=True) * gy
    gu = (r * k * vg).sum((0, 1))
    gw = -torch.exp(w) * dgd  # d = exp(-exp(w))  =>  ∂d/∂w = -exp(w)·d
    return gr, gk, gv, gw, gu


class _BiWKVCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, k, v, w, u):
        ext = get_extension("cpu")
        ct = _compute_dtype(r.dtype)
        N = r.shape[-1]
        pad = (-N) % ext.pad  # the kernel wants the head size padded to a multiple of ext.pad (zeros)

        def prep(x):
            x = x.to(ct)
            return (F.pad(x, (0, pad)) if pad else x).contiguous()

        rr, kk, vv, uu = prep(r), prep(k), prep(v), prep(u)
        ww = prep(w)
        y, d = ext.forward(rr, kk, vv, ww, uu)  # d = exp(-exp(w)), kept for the backward sweeps
        ctx.save_for_backward(rr, kk, vv, d, ww, uu)
        ctx.pad, ctx.dtypes = pad, (r.dtype, k.dtype, v.dtype, w.dtype, u.dtype)
        return (y[..., :N] if pad else y).to(r.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        rr, kk, vv, d, ww, uu = ctx.saved_tensors
        gyc = gy.to(rr.dtype)
        gyp = (F.pad(gyc, (0, ctx.pad)) if ctx.pad else gyc).contiguous()
        gr, gk, gv, gw, gu = get_extension("cpu").backward(rr, kk, vv, d, ww, uu, gyp)
        gu = gu.sum(0)
        N = rr.shape[-1] - ctx.pad
        return tuple((g[..., :N] if ctx.pad else g).to(dt) for g, dt in zip((gr, gk, gv, gw, gu), ctx.dtypes))


class _BiWKVCUDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, k, v, w, u):
        ext = get_extension("cuda")
        # The kernel reads r, k, v (and gy) in their own dtype (fp32/bf16/fp16) and accumulates in fp32.
        r_, k_, v_ = r.contiguous(), k.contiguous(), v.contiguous()
        wc = w.float()
        d = torch.exp(-torch.exp(wc)).contiguous()
        y = ext.forward(r_, k_, v_, d)  # fp32 scans, no bonus
        uc = u.float()
        y = y + (r_.float() * uc * k_.float()).sum(-1, keepdim=True) * v_.float()
        ctx.save_for_backward(r_, k_, v_, d, wc, uc)
        ctx.dtypes = (r.dtype, k.dtype, v.dtype, w.dtype, u.dtype)
        return y.to(r.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        r_, k_, v_, d, wc, uc = ctx.saved_tensors
        gy_ = gy.to(r_.dtype).contiguous()
        gr, gk, gv, dgd = get_extension("cuda").backward(r_, k_, v_, d, gy_)
        grads = _bonus_backward(r_.float(), k_.float(), v_.float(), wc, uc, gy_.float(), gr, gk, gv, dgd)
        return tuple(g.to(dt) for g, dt in zip(grads, ctx.dtypes))


def _kernel_or_reference(kind: str) -> bool:
    """For backend='auto': True if the `kind` extension is usable, else warn once and use the reference."""
    global _warned
    try:
        get_extension(kind)
        return True
    except RuntimeError as e:
        if not _warned:
            _warned = True
            warnings.warn(f"bi_wkv: falling back to the slow pure-PyTorch reference because {e}",
                          RuntimeWarning, stacklevel=3)
        return False


def bi_wkv(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, *,
           backend: str = "auto") -> torch.Tensor:
    """Bidirectional RWKV-6 WKV (DESIGN §2).

    Args:
        r, k, v, w: (B, T, H, N) receptance, key, value and raw decay logit (decay = exp(-exp(w))).
            r, k and v share a dtype: float32, bfloat16, float16 or float64.
        u: (H, N) bonus for the token itself (left scan only).
        backend: "auto" (CUDA kernel for CUDA tensors, C++ kernel for CPU tensors, reference if the build
            fails, with one warning), "reference", "cpu" or "cuda".

    Returns:
        y: (B, T, H, N) in r's dtype, differentiable with respect to all five inputs. Accumulation is
        fp32 (fp64 for float64 inputs).
    """
    _validate(r, k, v, w, u, backend)
    if backend == "auto":
        dev = r.device.type
        if dev == "cuda" and r.dtype != torch.float64 and r.shape[-1] <= CUDA_MAX_N \
                and _kernel_or_reference("cuda"):
            backend = "cuda"
        elif dev == "cpu" and _kernel_or_reference("cpu"):
            backend = "cpu"
        else:
            backend = "reference"
    if backend == "reference":
        return bi_wkv_reference(r, k, v, w, u)
    if backend == "cpu":
        return _BiWKVCPU.apply(r, k, v, w, u)
    return _BiWKVCUDA.apply(r, k, v, w, u)
