"""Starting a run from weights (``pretrained_path``) and locked towers (``lock_image`` / ``lock_text``, LiT)."""

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rwkv_clip import CLIPModule
from rwkv_clip.backbones import TextRWKV, TimmViT, VisionRWKV
from tiny_towers import TinyImageTower


def rwkv_towers():
    torch.manual_seed(0)
    image = VisionRWKV(img_size=16, patch_size=4, width=32, depth=2, head_size=16, mlp_ratio=2.0, drop_path_rate=0.5)
    text = TextRWKV(vocab_size=64, context_length=12, width=32, depth=2, head_size=16, ffn_hidden=64)
    return image, text


class BatchNormImageTower(TinyImageTower):
    """Has running statistics, which a forward pass in train mode would change."""

    def __init__(self, width: int = 32):
        super().__init__(width)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, images):
        return super().forward(self.bn(images))


def loader(n: int = 16, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g)
    tokens = torch.randint(1, 64, (n, 12), generator=g)
    tokens[:, 8:] = 0
    return DataLoader(TensorDataset(images, tokens), batch_size=batch_size)


def trainer(max_steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))


class RecordModes(L.Callback):
    def __init__(self):
        self.modes = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.modes.append((module.image_encoder.training, module.text_encoder.training))


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("locked, micro_batch_size", [("image", None), ("text", 4), ("batchnorm_image", None)])
def test_a_locked_tower_stays_bit_identical_over_training(locked, micro_batch_size):
    image, text = rwkv_towers()
    if locked == "batchnorm_image":
        image = BatchNormImageTower()
    model = CLIPModule(image, text, weight_decay=0.5, lr=1e-2, micro_batch_size=micro_batch_size,
                       lock_image=locked != "text", lock_text=locked == "text")
    frozen, trained = ("text_encoder", "image_encoder") if locked == "text" else ("image_encoder", "text_encoder")
    before = {name: snapshot(getattr(model, name)) for name in (frozen, trained)}
    modes = RecordModes()
    fit = trainer(4, [modes])
    fit.fit(model, loader())

    after_frozen, after_trained = snapshot(getattr(model, frozen)), snapshot(getattr(model, trained))
    assert all(torch.equal(after_frozen[k], v) for k, v in before[frozen].items())  # weights and buffers
    assert any(not torch.equal(after_trained[k], v) for k, v in before[trained].items())
    # Eval mode (norm statistics, drop path) on every step, also after Lightning's switches around validation.
    frozen_index = 1 if locked == "text" else 0
    assert len(modes.modes) == 4 and all(not m[frozen_index] and m[1 - frozen_index] for m in modes.modes)
    # Left out of the optimizer.
    in_optimizer = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in getattr(model, frozen).parameters()}
    assert {id(p) for p in getattr(model, trained).parameters()} <= in_optimizer
    assert not any(p.requires_grad for p in getattr(model, frozen).parameters())


def test_locking_both_towers_needs_projections():
    image, text = rwkv_towers()
    with pytest.raises(ValueError, match="embed_dim"):
        CLIPModule(image, text, lock_image=True, lock_text=True)
    model = CLIPModule(image, text, embed_dim=8, lock_image=True, lock_text=True)
    trainer(1).fit(model, loader())  # only the projections and the logit scale train


class RecordStart(L.Callback):
    def on_train_start(self, trainer, module):
        self.state = snapshot(module)
        self.step = trainer.global_step
        self.optimizer_state = dict(trainer.optimizers[0].state)


def test_pretrained_path_starts_fit_from_the_weights_with_a_fresh_optimizer(tmp_path):
    source = CLIPModule(*rwkv_towers(), lr=1e-2)
    first = trainer(3)
    first.fit(source, loader())
    first.save_checkpoint(tmp_path / "source.ckpt")
    torch.manual_seed(1)  # another init, so starting from it would show
    image, text = rwkv_towers()
    for p in list(image.parameters()) + list(text.parameters()):
        nn.init.normal_(p, std=0.02)
    model = CLIPModule(image, text, pretrained_path=str(tmp_path / "source.ckpt"))
    start = RecordStart()
    trainer(1, [start]).fit(model, loader())
    expected = snapshot(source)
    assert start.state.keys() == expected.keys()
    assert all(torch.equal(start.state[k], v) for k, v in expected.items())
    assert start.step == 0 and not start.optimizer_state  # not a resume: optimizer and schedule start fresh


def test_resuming_with_ckpt_path_keeps_the_run_weights(tmp_path):
    """--ckpt_path (resume) takes precedence over pretrained_path: the run goes on with its own weights."""
    pretrained = CLIPModule(*rwkv_towers())
    torch.save({"state_dict": pretrained.state_dict()}, tmp_path / "pretrained.ckpt")
    run = CLIPModule(*rwkv_towers(), lr=1e-2, pretrained_path=str(tmp_path / "pretrained.ckpt"))
    first = trainer(2)
    first.fit(run, loader())
    first.save_checkpoint(tmp_path / "run.ckpt")
    expected = snapshot(run)

    resumed = CLIPModule(*rwkv_towers(), lr=1e-2, pretrained_path=str(tmp_path / "pretrained.ckpt"))
    start = RecordStart()
    trainer(3, [start]).fit(resumed, loader(), ckpt_path=str(tmp_path / "run.ckpt"))
    assert start.step == 2
    assert all(torch.equal(start.state[k], v) for k, v in expected.items())


def test_pretrained_path_that_does_not_fit_names_the_keys(tmp_path):
    other = CLIPModule(*rwkv_towers(), embed_dim=8)  # has projections the model lacks
    torch.save({"state_dict": other.state_dict()}, tmp_path / "other.ckpt")
    model = CLIPModule(*rwkv_towers(), pretrained_path=str(tmp_path / "other.ckpt"))
    with pytest.raises(ValueError, match=r"unexpected keys: 2 \(image_projection.weight, text_projection.weight\)"):
        trainer(1).fit(model, loader())


def test_lit_with_a_local_timm_vit(tmp_path):
    """LiT: a timm ViT from a local file, locked; the text tower learns to match it."""
    arch = dict(model_name="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    torch.manual_seed(3)
    vit_weights = copy.deepcopy(TimmViT(**arch).model.state_dict())
    torch.save(vit_weights, tmp_path / "vit.pth")
    image = TimmViT(**arch, pretrained_path=str(tmp_path / "vit.pth"))
    _, text = rwkv_towers()
    model = CLIPModule(image, text, embed_dim=16, lock_image=True, lr=1e-2)
    before_text = snapshot(model.text_encoder)
    trainer(3).fit(model, loader())
    after = model.image_encoder.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in vit_weights.items())
    assert any(not torch.equal(model.text_encoder.state_dict()[k], v) for k, v in before_text.items())
