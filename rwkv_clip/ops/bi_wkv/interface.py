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


# One custom op, one contract, two kernels: rwkv_clip::bi_wkv(r, k, v, w, u) -> y and its backward
# rwkv_clip::bi_wkv_backward(r, k, v, w, u, gy) -> (gr, gk, gv, gw, gu) run the C++ kernel on CPU tensors and
# the CUDA kernel on CUDA tensors. Either kernel computes the whole thing, the decay d = exp(-exp(w)) and the
# bonus term included. Both ops take the caller's tensors as they are (any float dtype, any strides): casting
# and padding happen inside, so the autograd graph keeps only r, k, v, w and u, which the caller holds anyway,
# and no copy of them. Each op has a fake (shape-only) version and the forward its autograd formula, so that
# torch.compile traces a tower through bi_wkv without a graph break.

CPU_PAD = 16  # the C++ kernel wants the head size padded (with zeros) to a multiple of this (kPad in cpu.cpp)


@torch.library.custom_op("rwkv_clip::bi_wkv", mutates_args=())
def _op_forward(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor) -> Tensor:
    """y (B, T, H, N) in r's dtype."""
    raise NotImplementedError(f"bi_wkv has kernels for CPU and CUDA tensors, not for {r.device.type}")


@_op_forward.register_fake
def _(r, k, v, w, u):
    return torch.empty_like(r, memory_format=torch.contiguous_format)


@torch.library.custom_op("rwkv_clip::bi_wkv_backward", mutates_args=())
def _op_backward(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, gy: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(gr, gk, gv, gw, gu), each in the dtype of its input."""
    raise NotImplementedError(f"bi_wkv has kernels for CPU and CUDA tensors, not for {r.device.type}")


@_op_backward.register_fake
def _(r, k, v, w, u, gy):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (r, k, v, w, u))


def _cpu_prep(x: Tensor, ct: torch.dtype, pad: int) -> Tensor:
    x = x.to(ct)
    return (F.pad(x, (0, pad)) if pad else x).contiguous()


@_op_forward.register_kernel("cpu")
def _(r, k, v, w, u):
    ct, N = _compute_dtype(r.dtype), r.shape[-1]
    pad = (-N) % CPU_PAD
    y = get_extension("cpu").forward(*(_cpu_prep(x, ct, pad) for x in (r, k, v, w, u)))
    return (y[..., :N] if pad else y).to(r.dtype).contiguous()


@_op_backward.register_kernel("cpu")
def _(r, k, v, w, u, gy):
    ct, N = _compute_dtype(r.dtype), r.shape[-1]
    pad = (-N) % CPU_PAD
    gr, gk, gv, gw, gu = get_extension("cpu").backward(*(_cpu_prep(x, ct, pad) for x in (r, k, v, w, u, gy)))
    gu = gu.sum(0)  # the kernel returns gu per batch element
    return tuple((g[..., :N] if pad else g).to(x.dtype).contiguous()
                 for g, x in zip((gr, gk, gv, gw, gu), (r, k, v, w, u)))


@_op_forward.register_kernel("cuda")
def _(r, k, v, w, u):
    ext = get_extension("cuda")
    y = ext.forward(r.contiguous(), k.contiguous(), v.contiguous(), w.float().contiguous(), u.float().contiguous())
    return y.to(r.dtype)  # the kernel writes fp32


@_op_backward.register_kernel("cuda")
def _(r, k, v, w, u, gy):
    ext = get_extension("cuda")
    gr, gk, gv, gw, gu = ext.backward(r.contiguous(), k.contiguous(), v.contiguous(), w.float().contiguous(),
                                      u.float().contiguous(), gy.to(r.dtype).contiguous())
    gu = gu.sum(0)  # the kernel returns gu per batch element
    return tuple(g.to(x.dtype) for g, x in zip((gr, gk, gv, gw, gu), (r, k, v, w, u)))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # r, k, v, w, u: the kernels' backward recomputes everything else


def _grad(ctx, gy):
    return _op_backward(*ctx.saved_tensors, gy)


torch.library.register_autograd("rwkv_clip::bi_wkv", _grad, setup_context=_setup_context)


def _bi_wkv_cpu(r, k, v, w, u):
    return _op_forward(r, k, v, w, u)


def _bi_wkv_cuda(r, k, v, w, u):
    return _op_forward(r, k, v, w, u)


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
    """Bidirectional RWKV-6 WKV (docs/bi_wkv.md).

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
