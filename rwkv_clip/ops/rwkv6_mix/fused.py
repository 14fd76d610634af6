"""The RWKV-6 mixing maths of reference.py as autograd Functions that keep little for the backward pass.

Each Function computes exactly what its reference does, with the same PyTorch ops in the same order, but
saves only what is expensive to recompute (the input tokens, outputs of matrix products that feed an
elementwise op, and the low-rank activations) and recomputes the elementwise rest in backward: the token
shift, the lerps, the SiLU gate, the squared ReLU, the GroupNorm output. The backward runs under the
autocast state of the forward, so bf16 mixed precision computes what autograd would.

The token shift enters as the callable ``shift`` that made ``sx``: the Functions save ``x`` only and call
``shift(x)`` again in backward; the gradient for ``sx`` flows back through the caller's own shift.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _Autocast:
    """The autocast state of a forward pass, to re-enter in its backward."""

    @staticmethod
    def save(ctx, x: Tensor) -> None:
        ctx.device_type = x.device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.device_type)
        ctx.autocast_dtype = torch.get_autocast_dtype(ctx.device_type)

    @staticmethod
    def enter(ctx):
        return torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _weight_grad(g_out: Tensor, inp: Tensor, weight: Tensor) -> Tensor:
    """∂L/∂W of ``F.linear(inp, W)`` given ∂L/∂out."""
    return (_flat(g_out).t() @ _flat(inp)).to(weight.dtype)


def _input_grad(g_out: Tensor, weight: Tensor, inp: Tensor) -> Tensor:
    """∂L/∂inp of ``F.linear(inp, W)`` given ∂L/∂out, in inp's dtype (as autocast's cast would return it)."""
    return (g_out @ weight).to(inp.dtype)


def _vector_grad(g: Tensor, vec: Tensor) -> Tensor:
    """Reduce a (B, T, C) gradient to a broadcast (1, 1, C) vector's."""
    return g.sum((0, 1), keepdim=True).to(vec.dtype)


def _add_(a: Tensor, b: Tensor) -> Tensor:
    """a + b, in place in a when that is what a + b would be (same dtype, a's shape): a fresh large temporary
    costs more than the arithmetic, as its pages are new. Under autocast a bf16 ``a`` plus an fp32 ``b`` is fp32,
    so that case allocates, as the reference does."""
    return a.add_(b) if _in_place_ok(a, b) else a + b


def _mul_(a: Tensor, b: Tensor) -> Tensor:
    """a * b, in place in a where that gives the same result (see _add_)."""
    return a.mul_(b) if _in_place_ok(a, b) else a * b


def _in_place_ok(a: Tensor, b: Tensor) -> bool:
    return torch.promote_types(a.dtype, b.dtype) == a.dtype and torch.broadcast_shapes(a.shape, b.shape) == a.shape


class TimeMixInputs(torch.autograd.Function):
    """time_mix_inputs_reference, keeping x and the two low-rank tanh activations (rank 5*D and the decay's).

    The five lerps are one broadcast op over a (5, B, T, C) stack, forward and backward: a few large
    elementwise passes cost less than many small ones.
    """

    @staticmethod
    def forward(ctx, x, sx, shift, maa_x, maa_w, maa_k, maa_v, maa_r, maa_g, maa_w1, maa_w2, decay, decay_w1,
                decay_w2, W_r, W_k, W_v, W_g):
        B, T, C = x.shape
        xx = sx - x
        m = torch.tanh((x + xx * maa_x) @ maa_w1).view(B, T, 5, -1)
        maa = torch.stack((maa_w, maa_k, maa_v, maa_r, maa_g))  # (5, 1, 1, C)
        # x + xx * (maa + m @ maa_w2), in place on one fresh (5, B, T, C) tensor where the dtypes allow
        xw, xk, xv, xr, xg = _add_(_mul_(_add_(torch.einsum("btfd,fdc->fbtc", m, maa_w2), maa), xx), x)
        r, k, v, g = F.linear(xr, W_r), F.linear(xk, W_k), F.linear(xv, W_v), F.linear(xg, W_g)
        hd = torch.tanh(xw @ decay_w1)
        w = decay + hd @ decay_w2
        ctx.shift = shift
        _Autocast.save(ctx, x)
        ctx.save_for_backward(x, m, hd, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2, W_r, W_k, W_v, W_g)
        return r, k, v, g, w

    @staticmethod
    def backward(ctx, g_r, g_k, g_v, g_g, g_w):
        x, m, hd, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2, W_r, W_k, W_v, W_g = ctx.saved_tensors
        B, T, C = x.shape
        with _Autocast.enter(ctx):
            xx = ctx.shift(x) - x
            mix = _add_(torch.einsum("btfd,fdc->fbtc", m, maa_w2), maa)  # (5, B, T, C): w, k, v, r, g
            xw, xk, xv, xr, xg = xs = torch.addcmul(x, xx, mix)  # x + xx * mix in one pass
            # the decay's low-rank path: w = decay + tanh(xw @ decay_w1) @ decay_w2
            g_hpre = (g_w @ decay_w2.t()).to(hd.dtype) * (1 - hd * hd)
            g_decay_w2 = (_flat(hd).t() @ _flat(g_w)).to(decay_w2.dtype)
            g_decay_w1 = (_flat(xw).t() @ _flat(g_hpre)).to(decay_w1.dtype)
            g_xs = torch.stack((_input_grad(g_hpre, decay_w1.t(), xw), _input_grad(g_k, W_k, xk),
                                _input_grad(g_v, W_v, xv), _input_grad(g_r, W_r, xr), _input_grad(g_g, W_g, xg)))
            g_W = [_weight_grad(g, x_f, W) for g, x_f, W in ((g_r, xr, W_r), (g_k, xk, W_k), (g_v, xv, W_v),
                                                              (g_g, xg, W_g))]
            del xs, xw, xk, xv, xr, xg
            # the five lerps x_f = x + xx * (maa_f + m_f)
            g_x = g_xs.sum(0)
            g_xx = _mul_(mix, g_xs).sum(0)  # in place: mix and g_xs are not needed after these
            g_mix = _mul_(g_xs, xx)
            del mix, g_xs
            g_maa = g_mix.sum((1, 2), keepdim=True).to(maa.dtype)
            g_maa_w2 = torch.einsum("btfd,fbtc->fdc", m, g_mix).to(maa_w2.dtype)
            g_mpre = (torch.einsum("fbtc,fdc->btfd", g_mix, maa_w2).to(m.dtype) * (1 - m * m)).reshape(B, T, -1)
            del g_mix
            xxx = x + xx * maa_x
            g_maa_w1 = (_flat(xxx).t() @ _flat(g_mpre)).to(maa_w1.dtype)
            g_xxx = _input_grad(g_mpre, maa_w1.t(), xxx)
            g_x += g_xxx
            g_xx += g_xxx * maa_x
            g_maa_x = _vector_grad(g_xxx * xx, maa_x)
            g_x -= g_xx  # xx = sx - x
        return (g_x, g_xx, None, g_maa_x, *g_maa.unbind(0), g_maa_w1, g_maa_w2, _vector_grad(g_w, decay),
                g_decay_w1, g_decay_w2, *g_W)


class GatedGroupNorm(torch.autograd.Function):
    """gated_group_norm_reference, keeping the scan's output y and the gate (not the GroupNorm's output, the
    SiLU's, or their product)."""

    @staticmethod
    def forward(ctx, y, gate, gn_weight, gn_bias, groups, eps, W_o):
        B, T, C = y.shape
        _Autocast.save(ctx, y)
        y2 = _gn_input(ctx, y)
        z, mean, rstd = torch.native_group_norm(y2, gn_weight, gn_bias, B * T, C, 1, groups, eps)
        out = F.linear(z.view(B, T, C) * F.silu(gate), W_o)
        ctx.groups, ctx.eps = groups, eps
        ctx.save_for_backward(y, gate, mean, rstd, gn_weight, gn_bias, W_o)
        return out

    @staticmethod
    def backward(ctx, g_out):
        y, gate, mean, rstd, gn_weight, gn_bias, W_o = ctx.saved_tensors
        B, T, C = y.shape
        with _Autocast.enter(ctx):
            y2 = _gn_input(ctx, y)
            z = torch.native_group_norm(y2, gn_weight, gn_bias, B * T, C, 1, ctx.groups, ctx.eps)[0].view(B, T, C)
            s = F.silu(gate)
            zs = z * s
            g_W_o = _weight_grad(g_out, zs, W_o)
            g_zs = _input_grad(g_out, W_o, zs)
            del zs
            # in place where the operand is not needed afterwards (fresh large temporaries are costly)
            g_gate = torch.ops.aten.silu_backward(_mul_(z, g_zs), gate)
            g_z = _mul_(s, g_zs)
            g_y, g_gn_w, g_gn_b = torch.ops.aten.native_group_norm_backward(
                _flat(g_z).to(y2.dtype), y2, mean, rstd, gn_weight, B * T, C, 1, ctx.groups, [True, True, True])
            g_gate = g_gate.to(gate.dtype)
        return g_y.view(B, T, C).to(y.dtype), g_gate, g_gn_w, g_gn_b, None, None, g_W_o


def _gn_input(ctx, y: Tensor) -> Tensor:
    """y as F.group_norm sees it: (B*T, C), in fp32 under autocast (GroupNorm is on autocast's fp32 list)."""
    y2 = y.reshape(-1, y.shape[-1])
    return y2.float() if ctx.autocast and y2.dtype in (torch.bfloat16, torch.float16) else y2


class ChannelMix(torch.autograd.Function):
    """channel_mix_reference, keeping x, relu(W_k x_k) (not its square), sigmoid(W_r x_r) and W_v k²."""

    @staticmethod
    def forward(ctx, x, sx, shift, maa_k, maa_r, W_k, W_r, W_v, static_mix):
        xk, xr = _channel_lerps(x, sx, maa_k, maa_r, static_mix)
        kk = torch.relu(F.linear(xk, W_k))
        vk = F.linear(kk.square(), W_v)
        rr = torch.sigmoid(F.linear(xr, W_r))
        ctx.shift, ctx.static_mix = shift, static_mix
        _Autocast.save(ctx, x)
        ctx.save_for_backward(x, kk, rr, vk, maa_k, maa_r, W_k, W_r, W_v)
        return rr * vk

    @staticmethod
    def backward(ctx, g_out):
        x, kk, rr, vk, maa_k, maa_r, W_k, W_r, W_v = ctx.saved_tensors
        with _Autocast.enter(ctx):
            sx = ctx.shift(x)
            xk, xr = _channel_lerps(x, sx, maa_k, maa_r, ctx.static_mix)
            g_vk = g_out * rr
            g_rpre = torch.ops.aten.sigmoid_backward(g_out * vk, rr)
            g_W_v = _weight_grad(g_vk, kk.square(), W_v)
            # ∂(relu(a)²)/∂a = 2·relu(a): zero wherever the ReLU clipped, so no separate mask. The factor 2 is
            # applied to the (smaller) products below; doubling is exact in floating point.
            g_kpre_half = _input_grad(g_vk, W_v, kk).mul_(kk)
            g_W_k = _weight_grad(g_kpre_half, xk, W_k) * 2
            g_xk = _input_grad(g_kpre_half, W_k, xk) * 2
            g_W_r = _weight_grad(g_rpre, xr, W_r)
            g_xr = _input_grad(g_rpre, W_r, xr)
            if ctx.static_mix:  # x_* = x*mu + sx*(1-mu)
                g_x = g_xk * maa_k + g_xr * maa_r
                g_sx = g_xk * (1.0 - maa_k) + g_xr * (1.0 - maa_r)
                g_maa_k, g_maa_r = _vector_grad(g_xk * (x - sx), maa_k), _vector_grad(g_xr * (x - sx), maa_r)
            else:  # x_* = x + (sx-x)*mu
                g_sx = g_xk * maa_k + g_xr * maa_r
                g_x = g_xk + g_xr - g_sx
                g_maa_k, g_maa_r = _vector_grad(g_xk * (sx - x), maa_k), _vector_grad(g_xr * (sx - x), maa_r)
        return g_x, g_sx, None, g_maa_k, g_maa_r, g_W_k, g_W_r, g_W_v, None


def _channel_lerps(x, sx, maa_k, maa_r, static_mix: bool):
    if static_mix:
        return x * maa_k + sx * (1.0 - maa_k), x * maa_r + sx * (1.0 - maa_r)
    return x + (sx - x) * maa_k, x + (sx - x) * maa_r

