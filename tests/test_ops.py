"""Tests for rwkv_clip.ops.bi_wkv: every backend against an explicit O(T²) sum (docs/bi_wkv.md)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from rwkv_clip.ops import bi_wkv, bi_wkv_reference
from rwkv_clip.ops.bi_wkv import interface

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible: the CUDA kernel cannot run here")
CPU_BACKENDS = ["reference", "cpu"]


def explicit_bi_wkv(r, k, v, w, u):
    """y_t[j] = Σ_i r_t[i] (Σ_{s<t} Π_{m=s+1}^{t-1} d_m[i] k_s[i] v_s[j] + u[i] k_t[i] v_t[j]
                          + Σ_{s>t} Π_{m=t+1}^{s-1} d_m[i] k_s[i] v_s[j]),  d = exp(-exp(w)).

    Written from the formula, independently of any scan: for every t the decay weight of every s is a
    product of decays (a cumulative product over the tokens strictly between s and t). float64.
    """
    r, k, v, w, u = (x.detach().double() for x in (r, k, v, w, u))
    d = torch.exp(-torch.exp(w))  # (B, T, H, N)
    B, T, H, N = r.shape
    y = torch.zeros(B, T, H, N, dtype=torch.float64)
    for t in range(T):
        weight = torch.empty(B, T, H, N, dtype=torch.float64)
        # s < t: Π d[s+1 .. t-1]. Going down from s = t-1 (empty product = 1), each step multiplies by d[s+1].
        ones = torch.ones_like(d[:, :1])
        down = torch.cumprod(torch.cat([ones, torch.flip(d[:, 1:t], [1])], 1), 1)  # s = t-1, t-2, ..., 0
        weight[:, :t] = torch.flip(down, [1])[:, :t]
        weight[:, t] = u
        # s > t: Π d[t+1 .. s-1], the cumulative product of d[t+1 .. T-2], 1 for s = t+1
        after = torch.cat([ones, d[:, t + 1:T - 1]], 1)
        weight[:, t + 1:] = torch.cumprod(after, 1)[:, : T - t - 1]
        score = (r[:, t, None] * weight * k).sum(-1)  # (B, S, H): Σ_i r_t[i] weight_s[i] k_s[i]
        y[:, t] = torch.einsum("bsh,bshj->bhj", score, v)
    return y


def make_inputs(B, T, H, N, dtype=torch.float32, w_range=(-6.0, 1.0), seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) * 0.5 for _ in range(3))
    lo, hi = w_range
    w = lo + (hi - lo) * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    u = torch.randn(H, N, generator=g, dtype=torch.float64) * 0.5
    out = [x.to(dtype) for x in (r, k, v, w, u)]
    return [x.requires_grad_(requires_grad) for x in out]


def test_explicit_sum_is_the_formula_on_a_tiny_case():
    # Hand check of the oracle itself: T=3, one channel, so y_t = r_t Σ_s weight(s, t) k_s v_s.
    r, k, v = (torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) * c for c in (1.0, 0.5, -1.0))
    w = torch.tensor([0.1, -0.3, 0.2]).view(1, 3, 1, 1)
    u = torch.tensor([[0.7]])
    d = torch.exp(-torch.exp(w.view(3).double()))
    kv = (k * v).view(3).double()
    rr = r.view(3).double()
    want = torch.stack([
        rr[0] * (u.item() * kv[0] + kv[1] + d[1] * kv[2]),
        rr[1] * (kv[0] + u.item() * kv[1] + kv[2]),
        rr[2] * (d[1] * kv[0] + kv[1] + u.item() * kv[2]),
    ])
    torch.testing.assert_close(explicit_bi_wkv(r, k, v, w, u).view(3), want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 1, 2, 80), (2, 13, 3, 16), (3, 257, 1, 80), (1, 9, 2, 5), (2, 6, 1, 130)],
                         ids=lambda s: "B{}_T{}_H{}_N{}".format(*s))
def test_matches_explicit_sum(backend, shape):
    inputs = make_inputs(*shape)
    y = bi_wkv(*inputs, backend=backend)
    assert y.shape == shape and y.dtype == torch.float32
    want = explicit_bi_wkv(*inputs)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_decays_are_finite_and_exact(backend, dtype):
    # head 0: w = -20 (decay 1 - 2e-9, nothing forgotten); head 1: w = +5 (decay e^-148, no memory);
    # head 2: w uniform over [-20, 5] per token and channel.
    B, T, H, N = 2, 40, 3, 16
    r, k, v, w, u = make_inputs(B, T, H, N, dtype=dtype, w_range=(-20.0, 5.0), seed=1)
    w = w.clone()
    w[:, :, 0] = -20.0
    w[:, :, 1] = 5.0
    ins = [x.requires_grad_() for x in (r, k, v, w, u)]
    y = bi_wkv(*ins, backend=backend)
    want = explicit_bi_wkv(*ins)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, N, dtype=dtype)).sum(), ins)
    for name, g in zip("rkvwu", grads):
        assert torch.isfinite(g).all(), f"non-finite gradient for {name}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape, fast", [((1, 5, 2, 4), False), ((2, 4, 1, 17), True)], ids=["N4", "N17-fast"])
def test_gradcheck_float64(backend, shape, fast):
    inputs = make_inputs(*shape, dtype=torch.float64, w_range=(-3.0, 1.0), seed=2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: bi_wkv(*x, backend=backend), inputs, eps=1e-6, atol=1e-6,
                                    rtol=1e-5, fast_mode=fast)


def test_cpu_gradients_match_explicit_sum_long_sequence():
    # T=257 with slow and fast heads: the fused dw (prefix/suffix sums) must match autograd of the oracle.
    B, T, H, N = 1, 257, 2, 16
    ins = make_inputs(B, T, H, N, dtype=torch.float64, w_range=(-20.0, 5.0), seed=3, requires_grad=True)
    gy = torch.randn(B, T, H, N, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    g_cpu = torch.autograd.grad((bi_wkv(*ins, backend="cpu") * gy).sum(), ins)

    # oracle gradient: autograd through the reference scans in float64 (checked against the explicit sum above)
    g_ref = torch.autograd.grad((bi_wkv(*ins, backend="reference") * gy).sum(), ins)
    for name, a, b in zip("rkvwu", g_cpu, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8 * b.abs().max().item(), msg=f"grad {name}")


@pytest.mark.parametrize("shape", [(3, 33, 2, 80), (2, 77, 2, 64)], ids=["N80", "N64"])
def test_cpu_fp32_gradients_match_reference(shape):
    ins64 = make_inputs(*shape, dtype=torch.float64, w_range=(-8.0, 2.0), seed=5, requires_grad=True)
    ins32 = [x.detach().float().requires_grad_() for x in ins64]
    gy = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    y32 = bi_wkv(*ins32, backend="cpu")
    g32 = torch.autograd.grad((y32 * gy).sum(), ins32)
    y64 = bi_wkv(*ins64, backend="reference")
    g64 = torch.autograd.grad((y64 * gy.double()).sum(), ins64)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4 * y64.abs().max().item())
    for name, a, b in zip("rkvwu", g32, g64):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-4 * b.abs().max().item(), msg=f"grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_fp32(backend, dtype):
    # Inputs are rounded to bf16/fp16 once; the op accumulates in fp32, so the only extra error is
    # the final rounding of y (and of the gradients) to the input dtype: stated tolerance 1% of max|y|
    # for bf16 (8-bit mantissa) and 0.2% for fp16.
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    low = [x.requires_grad_() for x in make_inputs(2, 23, 2, 32, dtype=dtype, seed=7)]
    ref = [x.detach().float().requires_grad_() for x in low]
    y_low = bi_wkv(*low, backend=backend)
    y_ref = bi_wkv(*ref, backend=backend)
    assert y_low.dtype == dtype
    torch.testing.assert_close(y_low.float(), y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    gl = torch.autograd.grad(y_low.float().square().sum(), low)
    gr = torch.autograd.grad(y_ref.square().sum(), ref)
    for name, a, b in zip("rkvwu", gl, gr):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), b, rtol=3 * tol, atol=3 * tol * b.abs().max().item(), msg=name)


def test_mixed_dtypes_w_and_u_fp32_with_bf16_rkv():
    r, k, v, w, u = make_inputs(1, 8, 2, 16, seed=8)
    ins = [r.bfloat16(), k.bfloat16(), v.bfloat16(), w.requires_grad_(), u.requires_grad_()]
    y = bi_wkv(*ins, backend="cpu")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and u.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    B, T, H, N = 2, 11, 3, 24
    g = torch.Generator().manual_seed(9)
    # (B, H, T, N) storage transposed to (B, T, H, N), and a strided slice of the head size
    base = [torch.randn(B, H, T, 2 * N, generator=g) * 0.5 for _ in range(4)]
    nc = [x.transpose(1, 2)[..., ::2] for x in base]
    nc[3] = nc[3] - 2.0
    u = torch.randn(N, H, generator=g).t()
    assert not any(x.is_contiguous() for x in nc + [u])
    ins = [x.requires_grad_() for x in nc + [u]]  # leaf views cannot require grad; use copies below
    ins = [x.detach().requires_grad_() for x in ins]
    contig = [x.detach().contiguous().requires_grad_() for x in ins]
    y_nc, y_c = bi_wkv(*ins, backend=backend), bi_wkv(*contig, backend=backend)
    torch.testing.assert_close(y_nc, y_c)
    gy = torch.randn(B, T, H, N, generator=g).transpose(0, 1).contiguous().transpose(0, 1)  # strided grad
    for a, b in zip(torch.autograd.grad(y_nc, ins, gy), torch.autograd.grad(y_c, contig, gy.contiguous())):
        torch.testing.assert_close(a, b)


def test_backends_agree_on_model_shapes():
    # the shapes the towers use: image B/32 (T=49, 8 heads of 80) and text (T=77, 10 heads of 64)
    for shape in [(2, 49, 8, 80), (2, 77, 10, 64)]:
        ins = make_inputs(*shape, seed=10)
        torch.testing.assert_close(bi_wkv(*ins, backend="cpu"), bi_wkv(*ins, backend="reference"),
                                   rtol=1e-4, atol=1e-4)


def test_auto_uses_cpu_kernel_for_cpu_tensors(monkeypatch):
    calls = []
    orig = interface._bi_wkv_cpu
    monkeypatch.setattr(interface, "_bi_wkv_cpu", lambda *a: calls.append(1) or orig(*a))
    bi_wkv(*make_inputs(1, 3, 1, 8))
    assert calls == [1]


def test_custom_op_passes_torch_library_opcheck():
    """Schema, fake (shape-only) implementation and autograd registration, as torch.compile relies on them."""
    r, k, v, w, u = (x.contiguous() for x in make_inputs(2, 7, 2, 16, seed=3))
    for x in (r, k, v, w, u):
        x.requires_grad_(True)
    torch.library.opcheck(torch.ops.rwkv_clip.bi_wkv, (r, k, v, w, u))
    y = torch.ops.rwkv_clip.bi_wkv(r, k, v, w, u)
    torch.library.opcheck(torch.ops.rwkv_clip.bi_wkv_backward,
                          tuple(x.detach() for x in (r, k, v, w, u, torch.randn_like(y))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_keeps_only_its_inputs_for_backward(dtype):
    """The op saves r, k, v, w, u themselves (which its caller holds anyway): no decay, no fp32 or padded copies,
    even for bf16 inputs and a head size the CPU kernel pads (N = 8 -> 16)."""
    r, k, v, w, u = make_inputs(2, 5, 2, 8, seed=5)
    r, k, v = (x.to(dtype).requires_grad_() for x in (r, k, v))
    w, u = w.requires_grad_(), u.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = bi_wkv(r, k, v, w, u, backend="cpu")
    assert y.dtype == dtype
    assert {t.untyped_storage().data_ptr() for t in saved} == {x.untyped_storage().data_ptr() for x in (r, k, v, w, u)}


def test_cpu_and_cuda_share_one_contract():
    """One op for both devices: the same inputs (r, k, v in their dtype, fp32 w and u) give y in r's dtype and each
    gradient in its input's dtype; the kernels compute the decay and the bonus term themselves."""
    r, k, v, w, u = make_inputs(2, 9, 2, 8, seed=4)
    low = [x.to(torch.bfloat16).requires_grad_() for x in (r, k, v)] + [w.requires_grad_(), u.requires_grad_()]
    y = torch.ops.rwkv_clip.bi_wkv(*low)
    assert y.dtype == torch.bfloat16
    leaves = [x.detach().float().requires_grad_() for x in low]
    y_ref = bi_wkv_reference(*leaves)
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2, atol=1e-2)
    gy = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, low, gy.to(torch.bfloat16))
    grads_ref = torch.autograd.grad(y_ref, leaves, gy.to(torch.bfloat16).float())
    for name, g, g_ref, x in zip("rkvwu", grads, grads_ref, low):
        assert g.dtype == x.dtype and g.shape == g_ref.shape, name
        torch.testing.assert_close(g.float(), g_ref, rtol=2e-2, atol=2e-2 * g_ref.abs().max().item(),
                                   msg=lambda m: f"grad {name}: {m}")
    # the CUDA bindings take the same arguments as the CPU kernel (compiled, not run, without a GPU)
    here = os.path.join(os.path.dirname(interface.__file__))
    cuda_bind = open(os.path.join(here, "cuda_bind.cpp")).read()
    assert "forward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w," in cuda_bind
    assert "backward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w," in cuda_bind


def test_tower_compiles_without_graph_breaks_and_matches_eager():
    from rwkv_clip.backbones import VisionRWKV

    torch.manual_seed(0)
    tower = VisionRWKV(img_size=32, patch_size=8, width=40, depth=2, head_size=20, drop_path_rate=0.0)
    with torch.no_grad():
        for p in tower.parameters():  # away from the near-zero init, so that every path carries signal
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(2, 3, 32, 32)
    eager_out = tower(images)
    eager_out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in tower.parameters()]
    tower.zero_grad()
    torch._dynamo.reset()
    compiled_out = torch.compile(tower, fullgraph=True)(images)  # fullgraph: a graph break is an error
    compiled_out.square().sum().backward()
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
    for p, g in zip(tower.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5)


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    def broken(kind, verbose=False):
        raise RuntimeError(f"building the bi_wkv {kind} extension failed: no compiler (test)")

    monkeypatch.setattr(interface, "get_extension", broken)
    monkeypatch.setattr(interface, "_warned", False)
    ins = make_inputs(1, 5, 2, 8)
    with pytest.warns(RuntimeWarning, match="falling back.*reference.*no compiler") as rec:
        y1 = bi_wkv(*ins)
        y2 = bi_wkv(*ins)
    assert len([w for w in rec if "falling back" in str(w.message)]) == 1
    torch.testing.assert_close(y1, bi_wkv(*ins, backend="reference"))
    torch.testing.assert_close(y1, y2)
    with pytest.raises(RuntimeError, match="no compiler"):  # an explicit backend does not fall back silently
        bi_wkv(*ins, backend="cpu")


def _bad(**over):
    r, k, v, w, u = make_inputs(2, 5, 3, 8)
    args = dict(r=r, k=k, v=v, w=w, u=u)
    args.update(over)
    return args


@pytest.mark.parametrize("over, match", [
    (dict(r=torch.randn(2, 5, 24)), r"r must have shape \(B, T, H, N\)"),
    (dict(k=torch.randn(2, 5, 3, 7)), r"k must have shape \(B, T, H, N\) = \(2, 5, 3, 8\)"),
    (dict(v=torch.randn(2, 6, 3, 8)), r"v must have shape .*\(2, 5, 3, 8\)"),
    (dict(w=torch.randn(2, 5, 3)), r"w must have shape .*\(2, 5, 3, 8\)"),
    (dict(u=torch.randn(24)), r"u must have shape \(H, N\) = \(3, 8\)"),
    (dict(r=torch.zeros(2, 0, 3, 8), k=torch.zeros(2, 0, 3, 8), v=torch.zeros(2, 0, 3, 8),
          w=torch.zeros(2, 0, 3, 8)), r"every size >= 1"),
    (dict(k=torch.ones(2, 5, 3, 8, dtype=torch.int64)), r"k has dtype torch.int64"),
    (dict(u=torch.ones(3, 8, dtype=torch.complex64)), r"u has dtype torch.complex64"),
    (dict(v=torch.randn(2, 5, 3, 8).half()), r"v has dtype torch.float16 but r has torch.float32"),
    (dict(w=torch.randn(2, 5, 3, 8, device="meta")), r"w is on meta but r is on cpu"),
    (dict(r=[[1.0]]), r"r must be a torch.Tensor"),
])
def test_bad_inputs_raise_value_error(over, match):
    with pytest.raises(ValueError, match=match):
        bi_wkv(**_bad(**over))


def test_bad_backend_and_device_raise_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        bi_wkv(**_bad(), backend="triton")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        bi_wkv(**_bad(), backend="cuda")


def test_extension_is_cached_and_not_rebuilt():
    ext = interface.get_extension("cpu")
    assert interface.get_extension("cpu") is ext
    before = os.stat(ext.__file__).st_mtime_ns
    # the prebuild command in a fresh process finds the cached build and does not recompile
    out = subprocess.run([sys.executable, "-m", "rwkv_clip.ops.build", "--cuda", "false"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert ext.__file__ in out.stdout
    assert os.stat(ext.__file__).st_mtime_ns == before


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")),
                    reason="nvcc not found (set CUDA_HOME)")
def test_cuda_extension_compiles_and_links():
    # compiles for sm_80 and sm_90 even without a GPU (~3 min on 2 cores the first time, then cached)
    env = dict(os.environ, CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    out = subprocess.run([sys.executable, "-m", "rwkv_clip.ops.build", "--cuda", "--cpu", "false"], capture_output=True,
                         text=True, timeout=1800, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "8.0;9.0" in out.stdout and ".so" in out.stdout


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

@needs_cuda
@pytest.mark.parametrize("shape", [(3, 1, 2, 80), (2, 13, 3, 64), (3, 257, 1, 80), (1, 9, 2, 5), (2, 20, 2, 128),
                                   (1, 11, 1, 72)], ids=lambda s: "B{}_T{}_H{}_N{}".format(*s))
def test_cuda_matches_explicit_sum(shape):
    inputs = make_inputs(*shape, w_range=(-20.0, 5.0))
    y = bi_wkv(*[x.cuda() for x in inputs], backend="cuda")
    assert y.is_cuda and y.dtype == torch.float32
    want = explicit_bi_wkv(*inputs)
    torch.testing.assert_close(y.cpu().double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@needs_cuda
@pytest.mark.parametrize("shape", [(2, 33, 2, 80), (2, 77, 2, 64), (1, 300, 1, 100)], ids=["N80", "N64", "N100"])
def test_cuda_gradients_match_cpu_float64(shape):
    ins64 = make_inputs(*shape, dtype=torch.float64, w_range=(-20.0, 5.0), seed=11, requires_grad=True)
    insg = [x.detach().float().cuda().requires_grad_() for x in ins64]
    gy = torch.randn(*shape, generator=torch.Generator().manual_seed(12))
    yg = bi_wkv(*insg, backend="cuda")
    gg = torch.autograd.grad((yg * gy.cuda()).sum(), insg)
    y64 = bi_wkv(*ins64, backend="cpu")
    g64 = torch.autograd.grad((y64 * gy.double()).sum(), ins64)
    torch.testing.assert_close(yg.cpu().double(), y64, rtol=1e-4, atol=1e-4 * y64.abs().max().item())
    for name, a, b in zip("rkvwu", gg, g64):
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-4, atol=2e-4 * b.abs().max().item(), msg=name)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_matches_fp32(dtype):
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    low = [x.cuda().requires_grad_() for x in make_inputs(4, 196, 8, 80, dtype=dtype, seed=13)]
    ref = [x.detach().float().requires_grad_() for x in low]
    y_low, y_ref = bi_wkv(*low), bi_wkv(*ref)
    assert y_low.dtype == dtype
    torch.testing.assert_close(y_low.float(), y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    gl = torch.autograd.grad(y_low.float().square().sum(), low)
    gr = torch.autograd.grad(y_ref.square().sum(), ref)
    for name, a, b in zip("rkvwu", gl, gr):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=3 * tol, atol=3 * tol * b.abs().max().item(), msg=name)


@needs_cuda
def test_cuda_long_sequence_and_non_contiguous():
    B, T, H, N = 2, 4096, 2, 80
    base = [torch.randn(B, H, T, N, device="cuda") * 0.5 for _ in range(4)]
    r, k, v, w = (x.transpose(1, 2) for x in base)
    u = torch.randn(H, N, device="cuda")
    y = bi_wkv(r, k, v, w - 3, u)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.cpu(), bi_wkv(r.cpu(), k.cpu(), v.cpu(), (w - 3).cpu(), u.cpu(), backend="cpu"),
                               rtol=1e-4, atol=1e-3)
