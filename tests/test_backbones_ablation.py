"""Ablation backbones: timm ViT image tower and CLIP-style Transformer text tower."""

import pytest
import torch
import torch.nn.functional as F

from rwkv_clip.backbones.transformer import TextTransformer
from rwkv_clip.backbones.vit import TimmViT

TINY_VIT = dict(model_name="vit_tiny_patch16_224", img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3)


def tiny_vit(**kw) -> TimmViT:
    torch.manual_seed(0)
    return TimmViT(**{**TINY_VIT, **kw}).eval()


# ----------------------------------------------------------------------------------------------- TimmViT


def test_vit_shapes_width_and_other_resolution():
    m = tiny_vit()
    assert m.width == m.model.num_features == 48
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 48)
    # A resolution other than the training one works (timm resamples the position embedding on the fly).
    assert m(torch.randn(1, 3, 96, 128)).shape == (1, 48)


def test_vit_features_are_timm_pooling():
    m = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    # num_classes=0 makes timm's own forward return the pooled pre-logits features.
    torch.testing.assert_close(m(x), m.model(x))
    feats = m.model.forward_features(x)
    torch.testing.assert_close(m(x), m.model.forward_head(feats, pre_logits=True))
    assert isinstance(m.model.head, torch.nn.Identity)


def test_vit_named_base_model_builds_random_init():
    m = TimmViT("vit_base_patch32_224")
    assert m.width == 768
    assert 87e6 < sum(p.numel() for p in m.parameters()) < 89e6


def test_vit_pretrained_hub_refused_with_directions():
    with pytest.raises(ValueError, match="pretrained_path"):
        TimmViT(**TINY_VIT, pretrained=True)


def test_vit_unknown_name():
    with pytest.raises(ValueError, match="model_name"):
        TimmViT("vit_does_not_exist_224")


def test_vit_load_local_weights_wrapped_with_head(tmp_path):
    import timm

    torch.manual_seed(1)
    # A classifier checkpoint (with a 10-class head), saved Lightning-style with a wrapper prefix.
    src = timm.create_model(TINY_VIT["model_name"], pretrained=False, num_classes=10, img_size=64,
                            patch_size=16, embed_dim=48, depth=2, num_heads=3)
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    m = tiny_vit(pretrained_path=str(path))
    x = torch.randn(2, 3, 64, 64)
    src.eval()
    torch.testing.assert_close(m(x), src.forward_head(src.forward_features(x), pre_logits=True))

    # A plain state dict of our own tower round-trips too.
    path2 = tmp_path / "own.pth"
    torch.save(m.state_dict(), path2)
    m2 = tiny_vit(pretrained_path=str(path2))
    torch.testing.assert_close(m2(x), m(x))


def test_vit_load_resamples_position_embedding(tmp_path):
    from timm.layers import resample_abs_pos_embed

    src = tiny_vit()  # grid 4x4 at 64 px
    path = tmp_path / "vit.pth"
    torch.save({"model": src.model.state_dict()}, path)
    m = tiny_vit(img_size=96, pretrained_path=str(path))  # grid 6x6
    expected = resample_abs_pos_embed(src.model.pos_embed.detach(), new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(m.model.pos_embed.detach(), expected)
    assert m.model.pos_embed.shape[1] == 1 + 36
    torch.testing.assert_close(m.model.patch_embed.proj.weight, src.model.patch_embed.proj.weight)
    assert m(torch.randn(1, 3, 96, 96)).shape == (1, 48)


def test_vit_load_errors(tmp_path):
    with pytest.raises(ValueError, match="pretrained_path"):
        tiny_vit(pretrained_path=str(tmp_path / "missing.pth"))
    wrong = TimmViT(**{**TINY_VIT, "embed_dim": 96})
    path = tmp_path / "wrong.pth"
    torch.save(wrong.state_dict(), path)
    with pytest.raises(ValueError, match="do not fit"):
        tiny_vit(pretrained_path=str(path))
    path3 = tmp_path / "notsd.pth"
    torch.save([1, 2, 3], path3)
    with pytest.raises(ValueError, match="state dict"):
        tiny_vit(pretrained_path=str(path3))


def test_vit_bad_input():
    m = tiny_vit()
    with pytest.raises(ValueError, match="B, 3, H, W"):
        m(torch.randn(2, 64, 64))
    with pytest.raises(ValueError, match="patch size"):
        m(torch.randn(1, 3, 70, 64))


def test_vit_grad_checkpointing_same_gradients():
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        m = tiny_vit(grad_checkpointing=ckpt).train()
        m(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


# ----------------------------------------------------------------------------------------------- TextTransformer


def tiny_text(**kw) -> TextTransformer:
    torch.manual_seed(0)
    args = dict(vocab_size=100, context_length=77, width=32, layers=2, heads=4)
    return TextTransformer(**{**args, **kw}).eval()


def pad_to(ids, length, pad_id=0):
    return torch.tensor([ids + [pad_id] * (length - len(ids))])


@pytest.mark.parametrize("causal,pooling", [(True, "eot"), (False, "mean"), (False, "eot"), (True, "mean")])
def test_text_padding_invariance(causal, pooling):
    m = tiny_text(causal=causal, pooling=pooling)
    caption = [49, 5, 0, 17, 0, 23, 99]  # literal id 0 (= pad_id) inside the text stays a real token
    with torch.no_grad():
        short, long_ = m(pad_to(caption, 20)), m(pad_to(caption, 77))
        exact = m(torch.tensor([caption]))
    assert short.shape == (1, 32) and m.width == 32
    torch.testing.assert_close(short, long_, atol=1e-5, rtol=0)
    torch.testing.assert_close(short, exact, atol=1e-5, rtol=0)
    # The inner zeros are real: dropping one changes the features.
    with torch.no_grad():
        other = m(pad_to([49, 5, 17, 0, 23, 99], 20))
    assert (other - short).abs().max() > 1e-3


def test_text_batch_rows_independent_of_other_rows_padding():
    m = tiny_text(causal=False, pooling="mean")
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11]
    with torch.no_grad():
        batch = m(torch.cat([pad_to(a, 12), pad_to(b, 12)]))
        alone = m(torch.tensor([b]))
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=0)


def test_text_eot_pooling_is_last_real_token_not_argmax():
    m = tiny_text(causal=True, pooling="eot")
    ids = [3, 4, 99, 5, 6]  # the largest id sits mid-sentence; the end token is the last real one
    with torch.no_grad():
        pooled = m(pad_to(ids, 16))
        at_max = m(torch.tensor([ids[:3]]))  # causal: state at the argmax position == pooled prefix up to it
        at_last = m(torch.tensor([ids]))
    torch.testing.assert_close(pooled, at_last, atol=1e-5, rtol=0)
    assert (pooled - at_max).abs().max() > 1e-3


def test_text_causal_vs_bidirectional():
    # Causal: the first token's state ignores later tokens; bidirectional: it does not.
    for causal, should_change in ((True, False), (False, True)):
        m = tiny_text(causal=causal, pooling="eot")
        with torch.no_grad():
            a = m.ln_final(_hidden(m, torch.tensor([[1, 2, 3]])))[:, 0]
            b = m.ln_final(_hidden(m, torch.tensor([[1, 2, 50]])))[:, 0]
        assert ((a - b).abs().max() > 1e-4) == should_change


def _hidden(m, tokens):
    x = m.token_embedding(tokens) + m.positional_embedding[: tokens.shape[1]]
    mask = None if m.causal else torch.ones(1, 1, 1, tokens.shape[1], dtype=torch.bool)
    for blk in m.blocks:
        x = blk(x, mask, m.causal)
    return x


def test_text_uses_sdpa(monkeypatch):
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(k.get("is_causal"))
        return real_sdpa(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    m = tiny_text(layers=3)
    m(pad_to([1, 2, 3], 8))
    assert calls == [True, True, True]


def test_text_clip_init():
    m = TextTransformer(vocab_size=2000, context_length=77, width=256, layers=6, heads=4)
    assert abs(m.token_embedding.weight.std().item() - 0.02) < 0.002
    assert abs(m.positional_embedding.std().item() - 0.01) < 0.001
    proj_std = 256 ** -0.5 * 12 ** -0.5
    for blk in m.blocks:
        assert abs(blk.attn.qkv.weight.std().item() - 256 ** -0.5) < 0.1 * 256 ** -0.5
        assert abs(blk.attn.proj.weight.std().item() - proj_std) < 0.1 * proj_std
        assert abs(blk.mlp[0].weight.std().item() - 512 ** -0.5) < 0.1 * 512 ** -0.5
        assert abs(blk.mlp[2].weight.std().item() - proj_std) < 0.1 * proj_std
        assert blk.attn.qkv.bias.abs().max() == 0


def test_text_default_size_is_clip_b32():
    m = TextTransformer()
    n = sum(p.numel() for p in m.parameters())
    assert m.width == 512
    assert 63.0e6 < n < 63.3e6  # CLIP B/32 text tower without its projection: ~63.2M


def test_text_errors():
    with pytest.raises(ValueError, match="divisible"):
        TextTransformer(width=30, heads=4)
    with pytest.raises(ValueError, match="pooling"):
        TextTransformer(width=32, heads=4, layers=1, pooling="cls")
    m = tiny_text(context_length=8)
    with pytest.raises(ValueError, match="context_length"):
        m(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        m(torch.tensor([[1, 100]]))
    with pytest.raises(ValueError, match="token ids"):
        m(torch.randn(1, 4))


def test_text_all_pad_row_is_finite():
    m = tiny_text(causal=False, pooling="mean")
    out = m(torch.zeros(2, 5, dtype=torch.long))
    assert torch.isfinite(out).all()


def test_text_grad_checkpointing_same_gradients():
    tokens = torch.cat([pad_to([1, 2, 3, 4], 10), pad_to([5, 6], 10)])
    grads = []
    for ckpt in (False, True):
        m = tiny_text(causal=False, pooling="mean", grad_checkpointing=ckpt).train()
        m(tokens).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


# ----------------------------------------------------------------------------------------------- composition


def test_any_pairing_composes_in_clip_module():
    module = pytest.importorskip("rwkv_clip.module")
    image, text = tiny_vit(), tiny_text()
    model = module.CLIPModule(image_encoder=image, text_encoder=text, embed_dim=24)
    with torch.no_grad():
        img = model.encode_image(torch.randn(2, 3, 64, 64))
        txt = model.encode_text(torch.cat([pad_to([1, 2, 3], 10), pad_to([4, 5], 10)]))
    assert img.shape == txt.shape == (2, 24)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    # Different widths (48 vs 32) and no embed_dim: the module asks for embed_dim rather than guessing one.
    with pytest.raises(ValueError, match="embed_dim"):
        module.CLIPModule(image_encoder=tiny_vit(), text_encoder=tiny_text())
