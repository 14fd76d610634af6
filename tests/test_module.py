"""CLIPModule: loss, DDP gather with gradient, optimisation, logit-scale clamp, checkpoint round-trip."""

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rwkv_clip import CLIPModule, load_model
from rwkv_clip.loss import clip_loss, siglip_loss
from tiny_towers import TinyImageTower, TinyTextTower, fixed_batch

TESTS = Path(__file__).parent


def make_model(**kwargs) -> CLIPModule:
    torch.manual_seed(0)
    return CLIPModule(TinyImageTower(), TinyTextTower(), embed_dim=8, **kwargs)


def test_clip_loss_matches_explicit_formula():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * img @ txt.T
    # -log softmax of the diagonal, rows (image->text) and columns (text->image)
    expected = (-(logits.diag() - logits.logsumexp(1)).mean() - (logits.diag() - logits.logsumexp(0)).mean()) / 2
    assert torch.allclose(clip_loss(img, txt, img, txt, scale), expected, atol=1e-6)


def test_local_loss_labels_are_offset_by_rank():
    """Rank 1's rows score against every rank's columns, and its positives sit at rank·B + i."""
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    scale = torch.tensor(2.0)
    full = clip_loss(img, txt, img, txt, scale)
    local = [clip_loss(img[r * 3 : (r + 1) * 3], txt[r * 3 : (r + 1) * 3], img, txt, scale, rank=r) for r in range(2)]
    assert torch.allclose((local[0] + local[1]) / 2, full, atol=1e-6)
    sig_full = siglip_loss(img, txt, scale, torch.tensor(-1.0))
    sig_local = [siglip_loss(img[r * 3 : (r + 1) * 3], txt, scale, torch.tensor(-1.0), rank=r) for r in range(2)]
    assert torch.allclose((sig_local[0] + sig_local[1]) / 2, sig_full, atol=1e-6)


def test_siglip_matches_explicit_formula():
    img = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    s, b = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    expected = 0.0
    for i in range(3):
        for j in range(3):
            z = 1.0 if i == j else -1.0
            expected -= torch.log(torch.sigmoid(z * (10.0 * img[i] @ txt[j] - 10.0)))
    assert torch.allclose(siglip_loss(img, txt, s, b), expected / 3, atol=1e-5)


def test_projection_rules():
    with pytest.raises(ValueError, match="embed_dim"):
        CLIPModule(TinyImageTower(width=16), TinyTextTower(width=12))
    model = CLIPModule(TinyImageTower(width=16), TinyTextTower(width=12), embed_dim=10)
    images, tokens = fixed_batch(3)
    img, txt = model(images, tokens[:, :12] % 64)
    assert img.shape == txt.shape == (3, 10)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and torch.allclose(txt.norm(dim=-1), torch.ones(3))
    published = CLIPModule(TinyImageTower(width=16), TinyTextTower(width=16))  # no projection: widths match
    assert isinstance(published.image_projection, torch.nn.Identity)


def test_bad_batch_is_named():
    model = make_model()
    with pytest.raises(ValueError, match="images"):
        model.training_step((torch.zeros(2, 3, 16, 16), torch.zeros(3, 5, dtype=torch.long)), 0)


def test_weight_decay_groups_spare_gains_biases_and_temperature():
    model = make_model()
    decay, no_decay = model.parameter_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in spared
    assert "image_encoder.norm.weight" in spared and "text_encoder.mlp.0.bias" in spared
    assert "text_encoder.emb.weight" in decayed and "image_projection.weight" in decayed
    assert decay["weight_decay"] == model.weight_decay and no_decay["weight_decay"] == 0.0


def _fit(model, steps: int, batch, ckpt_path=None, **trainer_kwargs):
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs,
    )
    loader = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]))
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(loss):
    model = make_model(loss=loss, lr=5e-3, warmup=0.0)
    batch = fixed_batch(16)
    with torch.no_grad():
        before = model.contrastive_loss(*model(*batch)).item()
    _fit(model, 30, batch)
    with torch.no_grad():
        after = model.contrastive_loss(*model(*batch)).item()
    assert after < 0.7 * before, (before, after)


def test_logit_scale_is_clamped_after_each_step():
    model = make_model(warmup=0.0, max_logit_scale=20.0)
    seen = []

    class PushUp(L.Callback):  # before every step, set the scale above the bound; after it, read it back
        def on_train_batch_start(self, trainer, pl_module, *args):
            with torch.no_grad():
                pl_module.logit_scale.fill_(math.log(50.0))

        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(pl_module.logit_scale.item())

    _fit(model, 3, fixed_batch(8), callbacks=[PushUp()])
    assert seen == pytest.approx([math.log(20.0)] * 3)


def test_warmup_then_cosine_schedule():
    model = make_model(lr=1e-2, warmup=0.25)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _fit(model, 8, fixed_batch(4), callbacks=[Record()])
    assert lrs[0] == pytest.approx(1e-2 / 2) and lrs[1] == pytest.approx(1e-2)  # 2 warm-up steps
    assert lrs[2] == pytest.approx(1e-2)  # the cosine starts at the peak
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # then strictly decreasing
    assert lrs[-1] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))


def test_onecycle_schedule_is_torch_onecycle_lr_per_step():
    """scheduler="onecycle" trains with exactly the lr and betas of torch's OneCycleLR(max_lr=lr, pct_start=warmup),
    stepped once per optimizer step over the run's length."""
    steps = 20
    model = make_model(lr=1e-2, scheduler="onecycle", warmup=0.1, betas=(0.9, 0.98))
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            group = trainer.optimizers[0].param_groups[0]
            seen.append((group["lr"], tuple(group["betas"])))

    _fit(model, steps, fixed_batch(4), callbacks=[Record()])

    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-2, betas=(0.9, 0.98))
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps, pct_start=0.1)
    expected = []
    for _ in range(steps):
        expected.append((optimizer.param_groups[0]["lr"], tuple(optimizer.param_groups[0]["betas"])))
        optimizer.step()
        reference.step()
    assert seen == expected
    # The published shape: from lr/25 with beta1 0.95, to the peak with beta1 0.85 (step 1 = 10% of 20, minus
    # one), then down again; beta2 is never touched.
    assert seen[0] == (pytest.approx(1e-2 / 25), (0.95, 0.98))
    assert seen[1] == (pytest.approx(1e-2), (pytest.approx(0.85), 0.98))
    assert all(a[0] > b[0] and a[1][0] < b[1][0] for a, b in zip(seen[1:], seen[2:]))


def test_validation_loss_uses_no_collective(monkeypatch):
    """Ranks may hold different numbers of validation batches: validation_step must not gather."""
    model = make_model()
    monkeypatch.setattr(model, "_gather", lambda *a, **k: pytest.fail("validation_step gathered over ranks"))
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    images, tokens = fixed_batch(6)
    with torch.no_grad():
        loss = model.validation_step((images, tokens), 0)
        img, txt = model(images, tokens)
        assert torch.allclose(loss, clip_loss(img, txt, img, txt, model.logit_scale))


def test_a_resumed_run_keeps_the_schedule_length_of_its_checkpoint(tmp_path):
    """The schedule length is read from the checkpoint, not from a train loader built before the trainer restores
    its position; a changed run length is reported. Weights loaded for a new run carry no schedule."""
    model = make_model(lr=1e-2, warmup=0.25)
    trainer = _fit(model, 4, fixed_batch(4))
    trainer.save_checkpoint(tmp_path / "four.ckpt")
    saved = torch.load(tmp_path / "four.ckpt", weights_only=True)  # RNG states are stored as plain tensors
    assert saved["rwkv_clip"]["total_steps"] == 4 and torch.equal(saved["rwkv_clip"]["rng"]["torch"],
                                                                  torch.get_rng_state())

    resumed = make_model(lr=1e-2, warmup=0.25)
    with pytest.warns(UserWarning, match="set to 8 optimizer steps, but the learning-rate schedule it resumes spans 4"):
        _fit(resumed, 8, fixed_batch(4), ckpt_path=tmp_path / "four.ckpt")
    assert resumed._total_steps == 4 and resumed.lr_schedulers().last_epoch == 8

    new_run = CLIPModule.load_from_checkpoint(tmp_path / "four.ckpt", image_encoder=TinyImageTower(),
                                              text_encoder=TinyTextTower(), weights_only=True)
    _fit(new_run, 6, fixed_batch(4))
    assert new_run._total_steps == 6


def _run_ddp_worker(tmp_path, loss: str, micro_batch_size, steps: int) -> dict:
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(TESTS / "ddp_worker.py"), str(out), loss, str(micro_batch_size).lower(), str(steps)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("loss,micro_batch_size", [("infonce", None), ("siglip", None), ("infonce", 3)],
                         ids=["infonce", "siglip", "infonce-micro3"])
def test_two_process_ddp_matches_one_process_on_the_concatenated_batch(tmp_path, loss, micro_batch_size):
    """micro3: each rank encodes its 4 rows in chunks of 3 and 1 with cached features; still the same result."""
    result = _run_ddp_worker(tmp_path, loss, micro_batch_size, steps=1)
    model = make_model(loss=loss)
    images, tokens = fixed_batch(8)
    full_loss = model.contrastive_loss(*model(images, tokens))
    full_loss.backward()
    assert torch.allclose(result["rank_losses"].mean(), full_loss.detach(), atol=1e-5)
    assert not torch.allclose(result["rank_losses"][0], result["rank_losses"][1])  # each rank has its own rows
    for name, param in model.named_parameters():
        assert torch.allclose(result["grads"][name], param.grad, atol=1e-5, rtol=1e-4), name


class GradCapture(L.Callback):
    def __init__(self):
        self.grads, self.losses = None, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def _train_and_capture(model, batch, steps: int = 1):
    """The losses of each step, and the gradients of the last one."""
    capture = GradCapture()
    _fit(model, steps, batch, callbacks=[capture])
    return capture


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
@pytest.mark.parametrize("micro_batch_size", [1, 3, 8])
def test_micro_batches_give_the_whole_batch_loss_and_gradients(loss, micro_batch_size):
    batch = fixed_batch(8)
    whole = _train_and_capture(make_model(loss=loss), batch)
    chunked = _train_and_capture(make_model(loss=loss, micro_batch_size=micro_batch_size), batch)
    assert chunked.losses[0] == pytest.approx(whole.losses[0], abs=1e-6)
    assert set(chunked.grads) == set(whole.grads)
    for name, grad in whole.grads.items():
        assert torch.allclose(chunked.grads[name], grad, atol=1e-6, rtol=1e-5), name


class DropTower(nn.Module):
    """TinyImageTower with a strong dropout: the chunks' second pass must replay the first pass's masks."""

    def __init__(self):
        super().__init__()
        self.tower = TinyImageTower()
        self.width = self.tower.width

    def forward(self, images):
        return nn.functional.dropout(self.tower(images), p=0.5, training=self.training)


def test_two_process_ddp_micro_batches_over_several_steps(tmp_path):
    """Later steps too: each step's chunks accumulate locally and are all-reduced once, then AdamW moves on."""
    result = _run_ddp_worker(tmp_path, "infonce", 3, steps=3)
    capture = _train_and_capture(make_model(), fixed_batch(8), steps=3)
    assert result["rank_losses"].mean().item() == pytest.approx(capture.losses[-1], abs=1e-5)
    for name, grad in capture.grads.items():
        assert torch.allclose(result["grads"][name], grad, atol=1e-5, rtol=1e-4), name


def test_micro_batches_replay_the_random_state_of_each_chunk():
    """Reference: the chunks encoded once, with grad, in order, so the dropout masks are drawn in the same
    order as the cached pass; without replaying them, the recomputed chunks would get new masks."""
    images, tokens = fixed_batch(8)
    torch.manual_seed(0)
    model = CLIPModule(DropTower(), TinyTextTower(), embed_dim=8, micro_batch_size=3)
    reference = CLIPModule(DropTower(), TinyTextTower(), embed_dim=8)
    reference.load_state_dict(model.state_dict())

    torch.manual_seed(1)
    parts = [reference(images[i:i + 3], tokens[i:i + 3]) for i in range(0, 8, 3)]
    ref_loss = reference.contrastive_loss(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    ref_loss.backward()
    torch.manual_seed(1)
    loss = model._cached_feature_loss(images, tokens)  # what training_step runs, here without a Trainer
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    for name, param in reference.named_parameters():
        assert torch.allclose(model.get_parameter(name).grad, param.grad, atol=1e-6, rtol=1e-5), name


def test_accumulate_grad_batches_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="micro_batch_size"):
        _fit(make_model(), 2, fixed_batch(4), accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        make_model(micro_batch_size=0)


def test_compile_towers_trains_like_eager():
    from rwkv_clip.backbones import TextRWKV, VisionRWKV

    def make(compile_towers):
        torch.manual_seed(0)
        return CLIPModule(VisionRWKV(img_size=16, patch_size=4, width=32, depth=1, head_size=16, drop_path_rate=0.0),
                          TextRWKV(vocab_size=64, width=32, depth=1, head_size=16, ffn_hidden=64),
                          lr=1e-2, warmup=0.0, compile_towers=compile_towers)

    losses = []
    for compile_towers in (False, True):
        capture = GradCapture()
        model = make(compile_towers)
        _fit(model, 3, fixed_batch(8), callbacks=[capture])
        losses.append(capture.losses)
    assert model.image_encoder._compiled_call_impl is not None
    assert not any("_orig_mod" in k for k in model.state_dict())  # checkpoint keys as without compile
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)


def test_checkpoint_round_trip_through_load_model(tmp_path):
    model = make_model()
    trainer = _fit(model, 2, fixed_batch(4))
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.raises(ValueError, match="image_encoder"):  # towers built in Python: not in the checkpoint
        load_model(ckpt)
    loaded = load_model(ckpt, image_encoder=TinyImageTower(), text_encoder=TinyTextTower())
    assert not loaded.training
    images, tokens = fixed_batch(4, seed=1)
    model.eval()
    with torch.no_grad():
        for a, b in zip(model(images, tokens), loaded(images, tokens)):
            assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path / "missing.ckpt")


def test_weight_decay_groups_of_the_rwkv_towers():
    from rwkv_clip.backbones import TextRWKV, VisionRWKV

    model = CLIPModule(
        VisionRWKV(img_size=32, patch_size=8, width=32, depth=2, head_size=16, drop_path_rate=0.0),
        TextRWKV(vocab_size=50, context_length=16, width=32, depth=2, head_size=16, ffn_hidden=64),
    )
    decay, no_decay = model.parameter_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    for part in ("time_maa_x", "time_maa_w", "time_decay", "time_faaaa", "ffn.time_maa_k", "ln_x.weight", "pos_embed"):
        assert any(n.endswith(part) for n in spared), part
        assert not any(n.endswith(part) for n in decayed), part
    for part in ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2", "att.key.weight", "ffn.value.weight"):
        assert any(n.endswith(part) for n in decayed), part
    assert "text_encoder.emb.weight" in decayed and "image_encoder.patch_embed.weight" in decayed


# The weight-decay rule before the towers named their own parameters (a copy, to check nothing moved): names
# matching this pattern, parameters of fewer than 2 dims, and what a (non-rwkv_clip) module's no_weight_decay() names.
OLD_NO_DECAY_PATTERN = r"(^|\.)time_(?!\w*_w[12]$)\w+$|pos_embed|positional_embedding|cls_token|reg_token|logit_scale|logit_bias"


def old_parameter_groups(model: CLIPModule) -> tuple[set, set]:
    import re

    pattern = re.compile(OLD_NO_DECAY_PATTERN)
    no_decay_ids = set()
    for module in model.modules():
        if type(module).__module__.startswith("rwkv_clip"):  # our towers had no no_weight_decay() then
            continue
        if hasattr(module, "no_weight_decay") and callable(module.no_weight_decay):
            names = module.no_weight_decay()
            no_decay_ids |= {id(p) for n, p in module.named_parameters() if n in names}
    decay, no_decay = set(), set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        spared = param.ndim < 2 or id(param) in no_decay_ids or pattern.search(name) is not None
        (no_decay if spared else decay).add(name)
    return decay, no_decay


@pytest.mark.parametrize("image, text, kwargs", [
    ("vision_rwkv_b32", "text_rwkv_b32", {}),
    ("vision_rwkv_b16", "text_transformer_b32", {"embed_dim": 640}),
    ("vit_b32", "text_rwkv_b32", {"embed_dim": 640, "loss": "siglip"}),
    ("vit_b32", "text_transformer_b32", {"embed_dim": 512}),
    ("vision_rwkv_demo", "text_rwkv_demo", {"lock_image": True}),
    ("vit_demo", "text_transformer_demo", {"embed_dim": 32, "lock_text": True}),
    ("vit_demo", "text_rwkv_demo", {"embed_dim": 32, "loss": "siglip"}),
    ("vision_rwkv_demo", "text_transformer_demo", {}),
])
def test_weight_decay_groups_equal_the_old_name_rule(image, text, kwargs):
    from rwkv_clip.backbones import create_tower

    overrides = {"model_kwargs": {"reg_tokens": 2}} if image == "vit_demo" else {}  # register tokens too
    with torch.device("meta"):  # shapes only
        model = CLIPModule(create_tower(image, **overrides), create_tower(text), **kwargs)
    decay, no_decay = model.parameter_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    new = ({names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]})
    old = old_parameter_groups(model)
    assert new == old
    assert len(decay["params"]) == len(new[0]) and len(no_decay["params"]) == len(new[1])  # no parameter twice
    assert any(n.startswith("image_encoder.") for n in new[1]) != ("lock_image" in kwargs)  # locked: left out
    assert any(n.startswith("text_encoder.") for n in new[0]) != ("lock_text" in kwargs)
    if image == "vit_demo":
        assert "image_encoder.model.reg_token" in new[1]
