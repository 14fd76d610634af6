"""Tests of the Bi-RWKV towers (rwkv_clip/backbones/rwkv.py). Tiny widths: the whole file runs in seconds."""

import math

import pytest
import torch
import torch.nn as nn

from rwkv_clip.backbones.rwkv import TextRWKV, VisionRWKV, b_shift, q_shift


def tiny_vision(**kw):
    args = dict(img_size=32, patch_size=8, width=32, depth=2, head_size=8, mlp_ratio=2.0, drop_path_rate=0.0)
    return VisionRWKV(**{**args, **kw})


def tiny_text(**kw):
    args = dict(vocab_size=50, context_length=77, width=32, depth=2, head_size=8, ffn_hidden=48)
    return TextRWKV(**{**args, **kw})


@torch.no_grad()
def perturb(model, scale=0.2):
    """Random non-zero weights everywhere, so the zero-initialised matrices and the low-rank paths matter."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * scale)
    return model


def count(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- shapes


def test_output_shapes_and_width():
    torch.manual_seed(0)
    v, t = tiny_vision(), tiny_text()
    assert v.width == 32 and t.width == 32
    assert v(torch.randn(3, 3, 32, 32)).shape == (3, 32)
    assert t(torch.randint(1, 50, (4, 77))).shape == (4, 32)
    assert t(torch.randint(1, 50, (4, 9))).shape == (4, 32)  # shorter than the context is fine


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    for model, x in [(tiny_vision(), torch.randn(2, 3, 32, 32)), (tiny_text(), torch.randint(1, 50, (2, 12)))]:
        perturb(model)
        model(x).square().sum().backward()
        dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not dead, dead


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    v, t = perturb(tiny_vision()), perturb(tiny_text())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fi = v(torch.randn(2, 3, 32, 32))
        ft = t(torch.randint(1, 50, (2, 10)))
    (fi.float().sum() + ft.float().sum()).backward()
    assert torch.isfinite(fi.float()).all() and torch.isfinite(ft.float()).all()
    assert torch.isfinite(v.blocks[0].att.time_decay.grad).all()


# ---------------------------------------------------------------------------------------------- shifts


def test_q_shift_takes_each_quarter_from_its_neighbour():
    h, w, N, H = 3, 4, 8, 2  # 2 heads of 8 channels: quarters of 2 channels each
    x = torch.arange(1.0, h * w * H * N + 1).view(1, h * w, H * N)  # every entry distinct and non-zero
    out = q_shift(x, (h, w), N)

    def patch(i, j):  # row-major patch index, or None outside the grid
        return i * w + j if 0 <= i < h and 0 <= j < w else None

    for i in range(h):
        for j in range(w):
            # quarter 0 <- left, 1 <- right, 2 <- above, 3 <- below
            sources = [patch(i, j - 1), patch(i, j + 1), patch(i - 1, j), patch(i + 1, j)]
            for head in range(H):
                for q, src in enumerate(sources):
                    ch = slice(head * N + 2 * q, head * N + 2 * q + 2)
                    got = out[0, patch(i, j), ch]
                    want = torch.zeros(2) if src is None else x[0, src, ch]
                    assert torch.equal(got, want), (i, j, head, q)
    # one spelled-out case: patch (1, 1) is token 5; its channel 0 comes from (1, 0) = token 4,
    # channel 2 from (1, 2) = token 6, channel 4 from (0, 1) = token 1, channel 6 from (2, 1) = token 9
    assert [out[0, 5, c].item() for c in (0, 2, 4, 6)] == [x[0, t, c].item() for t, c in ((4, 0), (6, 2), (1, 4), (9, 6))]


def test_b_shift_takes_halves_from_previous_and_next_token():
    T, N, H = 5, 4, 2
    x = torch.arange(1.0, T * H * N + 1).view(1, T, H * N)
    out = b_shift(x, N)
    for t in range(T):
        for head in range(H):
            prev, nxt = slice(head * N, head * N + 2), slice(head * N + 2, head * N + 4)
            assert torch.equal(out[0, t, prev], x[0, t - 1, prev] if t > 0 else torch.zeros(2))
            assert torch.equal(out[0, t, nxt], x[0, t + 1, nxt] if t < T - 1 else torch.zeros(2))


# ---------------------------------------------------------------------------------------------- padding


def caption(length, pad_id=0):
    # sot, words (including a literal id 0 inside the text, which is *not* padding), eot, then pads
    ids = [49, 7, 0, 13, 21, 5, 48]
    return torch.tensor([ids + [pad_id] * (length - len(ids))])


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_padding_does_not_change_text_features(backend):
    torch.manual_seed(0)
    t = perturb(tiny_text(wkv_backend=backend)).eval()
    f77, f20, f7 = t(caption(77)), t(caption(20)), t(caption(7))
    torch.testing.assert_close(f77, f20, atol=1e-5, rtol=0)
    torch.testing.assert_close(f77, f7, atol=1e-5, rtol=0)
    # in a batch next to a longer caption too
    batch = torch.cat([caption(20), torch.randint(1, 50, (1, 20))])
    torch.testing.assert_close(t(batch)[:1], f20, atol=1e-5, rtol=0)


def test_padding_invariance_holds_with_another_pad_id():
    torch.manual_seed(1)
    t = perturb(tiny_text(pad_id=3)).eval()
    torch.testing.assert_close(t(caption(77, pad_id=3)), t(caption(12, pad_id=3)), atol=1e-5, rtol=0)


def test_published_pooling_sees_padding_and_matches_mean_without_it():
    torch.manual_seed(0)
    mean = perturb(tiny_text()).eval()
    published = tiny_text(pooling="published").eval()
    published.load_state_dict(mean.state_dict())
    full = torch.randint(1, 50, (2, 77))  # no padding at all: both poolings agree
    torch.testing.assert_close(published(full), mean(full), atol=1e-6, rtol=0)
    # the published model leaks padding into the features: the reason for the fix
    assert (published(caption(77)) - published(caption(20))).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- resolution


def test_model_built_for_224_runs_on_320_px():
    torch.manual_seed(0)
    v = VisionRWKV(img_size=224, patch_size=32, width=32, depth=1, head_size=8, mlp_ratio=2.0)
    perturb(v).eval()
    assert v.grid == (7, 7)
    assert v(torch.randn(2, 3, 320, 320)).shape == (2, 32)
    assert v(torch.randn(1, 3, 224, 320)).shape == (1, 32)  # non-square too
    assert v.resized_pos_embed((7, 7)) is v.pos_embed
    pe = v.resized_pos_embed((10, 10))
    assert pe.shape == (1, 100, 32)
    x = torch.randn(1, 3, 320, 320)
    before = v(x)
    with torch.no_grad():  # the resized embedding is really added: changing it changes the features
        v.pos_embed.fill_(0.5)
    assert (v(x) - before).abs().max() > 1e-3
    torch.testing.assert_close(v.resized_pos_embed((10, 10)), torch.full((1, 100, 32), 0.5))  # bicubic keeps constants


def test_bad_inputs_raise_clear_errors():
    v, t = tiny_vision(), tiny_text(context_length=16)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        v(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="shape"):
        v(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="context_length"):
        t(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        t(torch.full((1, 8), 50))
    with pytest.raises(ValueError, match="integer"):
        t(torch.ones(1, 8))
    with pytest.raises(ValueError, match="pooling"):
        tiny_text(pooling="cls")
    with pytest.raises(ValueError, match="head_size"):
        tiny_vision(head_size=6)


# ---------------------------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_grad_checkpointing_gives_same_gradients(tower):
    torch.manual_seed(0)
    if tower == "vision":
        make, x = lambda **kw: tiny_vision(drop_path_rate=0.5, **kw), torch.randn(4, 3, 32, 32)
    else:
        make, x = tiny_text, torch.cat([caption(12), torch.randint(1, 50, (3, 12))])
    plain, ckpt = perturb(make()), make(grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())

    calls = []
    ckpt.blocks[0].ln1.register_forward_hook(lambda *a: calls.append(1))  # (the block hook skips the recompute)
    grads = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(123)  # same drop-path draws
        model(x).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing really ran
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_drop_path_is_linear_over_blocks_and_off_in_eval():
    v = VisionRWKV(img_size=32, patch_size=8, width=32, depth=4, head_size=8, drop_path_rate=0.3)
    assert [round(b.drop_path.drop_prob, 6) for b in v.blocks] == [0.0, 0.1, 0.2, 0.3]
    perturb(v).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(v(x), v(x))


# ---------------------------------------------------------------------------------------------- init


def test_init_matches_rwkv6_formulas():
    C, L, l = 16, 4, 2
    v = VisionRWKV(img_size=16, patch_size=8, width=C, depth=L, head_size=8)
    att, ffn = v.blocks[l].att, v.blocks[l].ffn
    r01, r10 = l / (L - 1), 1 - l / L
    for n in (0, 5, 15):
        assert math.isclose(att.time_decay.flatten()[n].item(), -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01), rel_tol=1e-6)
        u = r01 * (1 - n / (C - 1)) + ((n + 1) % 3 - 1) * 0.1
        assert math.isclose(att.time_faaaa.flatten()[n].item(), u, rel_tol=1e-6, abs_tol=1e-7)
        assert math.isclose(att.time_maa_k.flatten()[n].item(), 1 - (n / C) ** r10, abs_tol=1e-6)
        assert math.isclose(att.time_maa_r.flatten()[n].item(), 1 - (n / C) ** (0.5 * r10), abs_tol=1e-6)
        assert math.isclose(att.time_maa_v.flatten()[n].item(), 1 - (n / C) ** r10 - 0.3 * r01, abs_tol=1e-6)
        # static image channel mix x*mu + shift*(1-mu): the weight on the neighbours follows the same pattern
        assert math.isclose(1 - ffn.time_maa_k.flatten()[n].item(), 1 - (n / C) ** r10, abs_tol=1e-6)
    assert att.time_faaaa.shape == (C // 8, 8)
    for p in (att.time_maa_w1, att.time_maa_w2, att.time_decay_w1, att.time_decay_w2):
        assert p.abs().max() <= 1e-4 and p.abs().max() > 0
    assert att.ln_x.eps == 1e-5
    assert torch.all(v.pos_embed == 0)

    t = TextRWKV(vocab_size=50, width=C, depth=L, head_size=8, ffn_hidden=24)
    blk = t.blocks[l]
    assert math.isclose(blk.ffn.time_maa_k.flatten()[3].item(), 1 - (3 / C) ** r10, abs_tol=1e-6)
    assert math.isclose(blk.att.ln_x.eps, 1e-5 * 64)
    assert math.isclose(blk.att.ln_x.weight[0].item(), ((1 + l) / L) ** 0.7, rel_tol=1e-6)
    for name in ("att.output", "ffn.value", "ffn.receptance"):
        assert torch.all(blk.get_submodule(name).weight == 0), name
    wk = blk.att.key.weight  # orthogonal, scaled by 0.1
    torch.testing.assert_close(wk @ wk.T, 0.01 * torch.eye(C), atol=1e-5, rtol=0)
    assert t.emb.weight.abs().max() <= 1e-4


def test_parameter_names_support_the_weight_decay_rules():
    """mu / decay / bonus vectors are all called time_*; every other parameter of 2+ dims is a real matrix."""
    for model in (tiny_vision(), tiny_text()):
        modules = dict(model.named_modules())
        for name, p in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            if leaf in ("time_maa_w1", "time_decay_w1", "time_decay_w2"):
                assert p.dim() == 2, name  # low-rank matrices (RWKV-LM gives them weight decay)
            elif leaf == "time_maa_w2":
                assert p.shape == (5, 32, model.width), name  # 5 stacked (32 -> C) matrices, as RWKV-LM
            elif leaf.startswith("time_"):
                assert p.numel() == model.width, name  # per-channel vectors: (1, 1, C) or (heads, head_size)
            elif name == "pos_embed":
                assert p.dim() == 3
            elif p.dim() >= 2:
                assert leaf == "weight" and isinstance(modules[owner], (nn.Linear, nn.Conv2d, nn.Embedding)), name
            else:
                assert leaf == "bias" or isinstance(modules[owner], (nn.LayerNorm, nn.GroupNorm)), name


# ---------------------------------------------------------------------------------------------- configs


def test_parameter_counts_of_published_configs():
    from rwkv_clip.backbones import create_tower

    with torch.device("meta"):
        b32 = create_tower("vision_rwkv_b32")
        b16 = create_tower("vision_rwkv_b16")
        text = create_tower("text_rwkv_b32")
    print(f"\nVisionRWKV B/32: {count(b32):,}  B/16: {count(b16):,}  TextRWKV: {count(text):,}")
    assert count(b32) == 84_207_360
    assert count(b16) == 82_826_880
    assert count(text) == 65_354_240
    assert len(b32.blocks[0].att.time_faaaa) == 8 and len(text.blocks[0].att.time_faaaa) == 10  # heads
