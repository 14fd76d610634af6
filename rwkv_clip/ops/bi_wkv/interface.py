"""Public bi_wkv(): input validation, backend dispatch, and the kernels as custom ops with their autograd."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

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


# The kernels are registered as torch.library custom ops, each with a fake (shape-only) version and its
# autograd formula, so that torch.compile traces a tower through bi_wkv without a graph break. Casting,
# padding and slicing stay outside the ops, in plain differentiable PyTorch.

CPU_PAD = 16  # the C++ kernel wants the head size padded (with zeros) to a multiple of this (kPad in cpu.cpp)


@torch.library.custom_op("rwkv_clip::bi_wkv_cpu", mutates_args=(), device_types="cpu")
def _cpu_forward(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """(y, d = exp(-exp(w))) of contiguous fp32/fp64 (B, T, H, Np) inputs, Np a multiple of CPU_PAD."""
    y, d = get_extension("cpu").forward(r, k, v, w, u)
    return y, d


@_cpu_forward.register_fake
def _(r, k, v, w, u):
    return torch.empty_like(r), torch.empty_like(r)


@torch.library.custom_op("rwkv_clip::bi_wkv_cpu_backward", mutates_args=(), device_types="cpu")
def _cpu_backward(r: Tensor, k: Tensor, v: Tensor, d: Tensor, w: Tensor, u: Tensor, gy: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    gr, gk, gv, gw, gu = get_extension("cpu").backward(r, k, v, d, w, u, gy)
    return gr, gk, gv, gw, gu.sum(0)  # the kernel returns gu per batch element


@_cpu_backward.register_fake
def _(r, k, v, d, w, u, gy):
    return tuple(torch.empty_like(r) for _ in range(4)) + (torch.empty_like(u),)


def _cpu_setup_context(ctx, inputs, output):
    r, k, v, w, u = inputs
    ctx.save_for_backward(r, k, v, output[1], w, u)  # the kernel's backward recomputes the states from these


def _cpu_grad(ctx, gy, _gd):
    r, k, v, d, w, u = ctx.saved_tensors
    return _cpu_backward(r, k, v, d, w, u, gy.contiguous())


torch.library.register_autograd("rwkv_clip::bi_wkv_cpu", _cpu_grad, setup_context=_cpu_setup_context)


def _bi_wkv_cpu(r, k, v, w, u):
    ct = _compute_dtype(r.dtype)
    N = r.shape[-1]
    pad = (-N) % CPU_PAD

    def prep(x):
        x = x.to(ct)
        return (F.pad(x, (0, pad)) if pad else x).contiguous()

    y, _ = _cpu_forward(prep(r), prep(k), prep(v), prep(w), prep(u))
    return (y[..., :N] if pad else y).to(r.dtype)


def _scans_with_bonus(ext, r, k, v, w, u):
    """(y in r's dtype, d = exp(-exp(w)) in fp32) from ``ext.forward(r, k, v, d)``, the fp32 scans without the
    bonus (the CUDA kernel, which reads r, k, v in their own dtype); the bonus term is added here."""
    d = torch.exp(-torch.exp(w.float())).contiguous()
    y = ext.forward(r, k, v, d)
    y = y + (r.float() * u.float() * k.float()).sum(-1, keepdim=True) * v.float()
    return y.to(r.dtype), d


def _scan_grads_with_bonus(ext, r, k, v, d, w, u, gy):
    """fp32 (gr, gk, gv, gw, gu) from ``ext.backward(r, k, v, d, gy)`` = (gr, gk, gv, d·∂L/∂d) of the scans."""
    gy = gy.to(r.dtype).contiguous()
    gr, gk, gv, dgd = ext.backward(r, k, v, d, gy)
    return _bonus_backward(r.float(), k.float(), v.float(), w.float(), u.float(), gy.float(), gr, gk, gv, dgd)


@torch.library.custom_op("rwkv_clip::bi_wkv_cuda", mutates_args=(), device_types="cuda")
def _cuda_forward(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """(y in r's dtype, d = exp(-exp(w)) in fp32) of contiguous (B, T, H, N) r, k, v (fp32/bf16/fp16)."""
    return _scans_with_bonus(get_extension("cuda"), r, k, v, w, u)


@_cuda_forward.register_fake
def _(r, k, v, w, u):
    return torch.empty_like(r), torch.empty_like(r, dtype=torch.float32)


@torch.library.custom_op("rwkv_clip::bi_wkv_cuda_backward", mutates_args=(), device_types="cuda")
def _cuda_backward(r: Tensor, k: Tensor, v: Tensor, d: Tensor, w: Tensor, u: Tensor, gy: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fp32 gradients for r, k, v, w, u."""
    return _scan_grads_with_bonus(get_extension("cuda"), r, k, v, d, w, u, gy)


@_cuda_backward.register_fake
def _(r, k, v, d, w, u, gy):
    return tuple(torch.empty_like(r, dtype=torch.float32) for _ in range(4)) + (
        torch.empty_like(u, dtype=torch.float32),)


def _cuda_setup_context(ctx, inputs, output):
    r, k, v, w, u = inputs
    ctx.save_for_backward(r, k, v, output[1], w, u)
    ctx.dtypes = tuple(x.dtype for x in inputs)


def _cuda_grad(ctx, gy, _gd):
    r, k, v, d, w, u = ctx.saved_tensors
    grads = _cuda_backward(r, k, v, d, w, u, gy)
    return tuple(g.to(dt) for g, dt in zip(grads, ctx.dtypes))


torch.library.register_autograd("rwkv_clip::bi_wkv_cuda", _cuda_grad, setup_context=_cuda_setup_context)


def _bi_wkv_cuda(r, k, v, w, u):
    y, _ = _cuda_forward(r.contiguous(), k.contiguous(), v.contiguous(), w, u)
    return y


@torch.compiler.assume_constant_result  # torch.compile: decided once, while tracing, not traced
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
        return _bi_wkv_cpu(r, k, v, w, u)
    return _bi_wkv_cuda(r, k, v, w, u)
