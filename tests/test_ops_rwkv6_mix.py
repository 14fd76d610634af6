"""rwkv_clip.ops.rwkv6_mix: the fused Functions against the readable reference (today's maths).

Outputs and every gradient within 1e-6 in fp32, gradcheck in fp64, the same maths under bf16 autocast, whole
towers fused vs reference, and fewer bytes kept for backward.
"""
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from rwkv_clip.backbones.rwkv import TextRWKV, VisionRWKV, b_shift, q_shift
from rwkv_clip.ops import rwkv6_mix
from rwkv_clip.ops.rwkv6_mix import (channel_mix, channel_mix_reference, gated_group_norm, gated_group_norm_reference,
                                     time_mix_inputs, time_mix_inputs_reference)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_backbones import saved_bytes  # noqa: E402

B, H, N, D = 2, 2, 8, 4  # batch, heads, head size, rank of the data-dependent lerp
C = H * N
GRID = (2, 3)
T = GRID[0] * GRID[1]


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def p(*shape, scale=0.5):
        return (scale * torch.randn(*shape, generator=g)).to(dtype).requires_grad_()

    return g, p


def time_mix_args(dtype=torch.float32, seed=0):
    g, p = _params(dtype, seed)
    x = p(B, T, C, scale=1.0)
    maa = tuple(p(1, 1, C) for _ in range(5))
    return (x, p(1, 1, C), maa, p(C, 5 * D), p(5, D, C), p(1, 1, C), p(C, 6), p(6, C),
            p(C, C), p(C, C), p(C, C), p(C, C))


def flat_leaves(args):
    out = []
    for a in args:
        out.extend(a if isinstance(a, tuple) else [a])
    return out


def shifts():
    """The two towers' shifts: Q-Shift on the patch grid, and B-Shift with pads zeroed (text, mean pooling)."""
    real = torch.tensor([[1.0] * T, [1.0] * (T - 2) + [0.0] * 2]).unsqueeze(-1)
    return {"q_shift": partial(q_shift, grid=GRID, head_size=N),
            "b_shift_masked": lambda t: b_shift(t * real.to(t.dtype), N)}


def _grads(fn, leaves, seed=1):
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return [o.detach() for o in outs], torch.autograd.grad(loss, leaves)


def assert_same(fused, ref, tol=1e-6):
    (outs_f, grads_f), (outs_r, grads_r) = fused, ref
    for a, b in zip(outs_f, outs_r):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for i, (a, b) in enumerate(zip(grads_f, grads_r)):
        scale = max(b.abs().max().item(), 1.0)  # sums over B*T tokens: compare relative to their size
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"gradient of input {i}: {m}")


@pytest.mark.parametrize("shift", shifts().values(), ids=shifts().keys())
def test_time_mix_inputs_match_reference_fp32(shift):
    args = time_mix_args()
    leaves = flat_leaves(args)
    ref = _grads(lambda: time_mix_inputs(args[0], shift, *args[1:], fused=False), leaves)
    fused = _grads(lambda: time_mix_inputs(args[0], shift, *args[1:], fused=True), leaves)
    assert_same(fused, ref)


@pytest.mark.parametrize("shift", shifts().values(), ids=shifts().keys())
def test_time_mix_inputs_gradcheck_fp64(shift):
    args = time_mix_args(torch.float64)
    leaves = flat_leaves(args)

    def fn(*ls):
        x, maa_x, mw, mk, mv, mr, mg, *rest = ls
        return rwkv6_mix.TimeMixInputs.apply(x, shift(x), shift, maa_x, mw, mk, mv, mr, mg, *rest)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, fast_mode=True)


def gn_args(dtype=torch.float32, seed=0):
    g, p = _params(dtype, seed)
    return p(B, T, C, scale=1.0), p(B, T, C, scale=2.0), p(C) , p(C), p(C, C)


def test_gated_group_norm_matches_reference_fp32():
    y, gate, w, b, W_o = leaves = gn_args()
    ref = _grads(lambda: gated_group_norm(y, gate, w, b, H, 1e-5, W_o, fused=False), leaves)
    fused = _grads(lambda: gated_group_norm(y, gate, w, b, H, 1e-5, W_o, fused=True), leaves)
    assert_same(fused, ref)


def test_gated_group_norm_gradcheck_fp64():
    y, gate, w, b, W_o = gn_args(torch.float64)
    assert torch.autograd.gradcheck(lambda *a: rwkv6_mix.GatedGroupNorm.apply(*a[:4], H, 1e-5 * 64, a[4]),
                                    (y, gate, w, b, W_o), eps=1e-6, atol=1e-5, fast_mode=True)


def cm_args(dtype=torch.float32, seed=0):
    g, p = _params(dtype, seed)
    return p(B, T, C, scale=1.0), p(1, 1, C), p(1, 1, C), p(5 * C, C), p(C, C), p(C, 5 * C)


@pytest.mark.parametrize("static_mix", [True, False], ids=["static", "rwkv_lm"])
@pytest.mark.parametrize("shift", shifts().values(), ids=shifts().keys())
def test_channel_mix_matches_reference_fp32(shift, static_mix):
    x, mk, mr, Wk, Wr, Wv = leaves = cm_args()
    ref = _grads(lambda: channel_mix(x, shift, mk, mr, Wk, Wr, Wv, static_mix, fused=False), leaves)
    fused = _grads(lambda: channel_mix(x, shift, mk, mr, Wk, Wr, Wv, static_mix, fused=True), leaves)
    assert_same(fused, ref)


@pytest.mark.parametrize("static_mix", [True, False], ids=["static", "rwkv_lm"])
def test_channel_mix_gradcheck_fp64(static_mix):
    shift = shifts()["q_shift"]
    leaves = cm_args(torch.float64)
    # relu(a)² has a continuous derivative 2·relu(a), so finite differences across a = 0 stay accurate
    assert torch.autograd.gradcheck(lambda x, *a: rwkv6_mix.ChannelMix.apply(x, shift(x), shift, *a, static_mix),
                                    leaves, eps=1e-7, atol=1e-5, fast_mode=True)


def test_fused_under_bf16_autocast_computes_what_autograd_does():
    """Under CPU bf16 autocast the fused Functions run the same ops in the same dtypes: outputs equal the
    reference's, and gradients agree to bf16 precision (their summation order differs)."""
    shift = shifts()["q_shift"]
    args = time_mix_args()
    leaves = flat_leaves(args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(lambda: time_mix_inputs(args[0], shift, *args[1:], fused=False), leaves)
        fused = _grads(lambda: time_mix_inputs(args[0], shift, *args[1:], fused=True), leaves)
    for a, b in zip(fused[0], ref[0]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    for a, b in zip(fused[1], ref[1]):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * max(b.abs().max().item(), 1.0))
    x, mk, mr, Wk, Wr, Wv = cm_leaves = cm_args()
    y, gate, gn_w, gn_b, W_o = gn_leaves = gn_args()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fn, ls in ((lambda f: channel_mix(x, shift, mk, mr, Wk, Wr, Wv, True, fused=f), cm_leaves),
                       (lambda f: gated_group_norm(y, gate.bfloat16(), gn_w, gn_b, H, 1e-5, W_o, fused=f), gn_leaves)):
            (o_f,), g_f = _grads(lambda: fn(True), ls)
            (o_r,), g_r = _grads(lambda: fn(False), ls)
            assert o_f.dtype == o_r.dtype == torch.bfloat16
            torch.testing.assert_close(o_f, o_r)
            for got, want in zip(g_f, g_r):
                torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * max(want.abs().max().item(), 1.0))


def _towers():
    torch.manual_seed(0)
    vis = VisionRWKV(img_size=32, patch_size=8, width=32, depth=2, head_size=16, drop_path_rate=0.0)
    txt = TextRWKV(vocab_size=50, context_length=12, width=32, depth=2, head_size=16, ffn_hidden=48)
    for m in (vis, txt):
        with torch.no_grad():
            for p in m.parameters():  # away from the near-zero init, so that every path carries signal
                p.add_(0.05 * torch.randn_like(p))
    return {"vision": (vis, torch.randn(2, 3, 32, 32)),
            "text": (txt, torch.tensor([[3, 4, 5, 6, 0, 0], [7, 8, 9, 1, 2, 0]]))}


@pytest.mark.parametrize("name", ["vision", "text"])
def test_towers_fused_match_reference_and_keep_fewer_bytes(name, monkeypatch):
    model, x = _towers()[name]
    results = {}
    for fused in (False, True):
        monkeypatch.setattr(rwkv6_mix, "FUSED", fused)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results[fused] = (out.detach(), [p.grad.clone() for p in model.parameters()], saved_bytes(model, x))
    (o_f, g_f, bytes_f), (o_r, g_r, bytes_r) = results[True], results[False]
    torch.testing.assert_close(o_f, o_r, rtol=1e-6, atol=1e-6)
    for (n, p), a, b in zip(model.named_parameters(), g_f, g_r):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * max(b.abs().max().item(), 1.0), msg=n)
    assert bytes_f < 0.6 * bytes_r, (bytes_f, bytes_r)


def test_grad_checkpointing_on_top_of_the_fused_path():
    model, x = _towers()["vision"]
    model.zero_grad()
    model(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    bytes_plain = saved_bytes(model, x)
    model.grad_checkpointing = True
    model.zero_grad()
    model(x).square().sum().backward()
    for a, b in zip((p.grad for p in model.parameters()), want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert saved_bytes(model, x) < bytes_plain


def test_saved_bytes_counts_distinct_storages_without_parameters():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            h = self.lin(x)  # saves x (80 bytes) and the weight (a parameter: not counted)
            return torch.tanh(h) * h[:, :1]  # tanh saves its output (60); mul saves both operands: h (60) + view

    assert saved_bytes(Net(), x) == 5 * 4 * 4 + 5 * 3 * 4 + 5 * 3 * 4
