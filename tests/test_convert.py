"""The released RWKV-CLIP checkpoints: conversion, and the official code's own outputs reproduced.

``../shared/data/official_rwkv_clip/`` holds a small model saved exactly as the official ``train.py`` saves
``model_31.pt`` (``module.`` prefix, official key names, bf16 text decays) and the official model's outputs on
fixed inputs. Tests that need it skip when it is absent; the error-path tests build their own files.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_clip import load_model
from rwkv_clip.convert import KEY_RULES, convert, official_to_checkpoint, rename_official, tower_specs

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = REPO.parent / "shared" / "data" / "official_rwkv_clip"
needs_official = pytest.mark.skipif(not (OFFICIAL / "official_tiny.pt").is_file(),
                                    reason=f"reference data {OFFICIAL} not present")


@pytest.fixture(scope="module")
def official():
    if not (OFFICIAL / "official_tiny.pt").is_file():
        pytest.skip(f"reference data {OFFICIAL} not present")
    return torch.load(OFFICIAL / "official_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def official_io():
    return torch.load(OFFICIAL / "official_tiny_io.pt", weights_only=True)


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory) -> Path:
    return convert(str(OFFICIAL / "official_tiny.pt"), str(tmp_path_factory.mktemp("conv") / "tiny.ckpt"), tokenizer=None)


def assert_reproduces_official(model, io) -> None:
    assert not model.training
    with torch.no_grad():
        for size in (224, 320):  # 320: the position embedding is resized bicubically
            ours = model.image_encoder(io[f"images_{size}"])
            assert (ours - io[f"image_features_{size}"]).abs().max() < 1e-5, size
        assert (model.text_encoder(io["tokens"]) - io["text_features"]).abs().max() < 1e-5
        assert torch.allclose(model.logit_scale.exp(), io["logit_scale"])


@needs_official
def test_converted_towers_reproduce_the_official_outputs(converted, official_io):
    assert_reproduces_official(load_model(converted), official_io)


@needs_official
def test_load_model_reads_the_official_file_directly(official_io):
    model = load_model(OFFICIAL / "official_tiny.pt")
    assert_reproduces_official(model, official_io)
    assert model.tokenizer_spec is None  # a 4096-token vocabulary is not CLIP's BPE, so no tokenizer is guessed


@needs_official
def test_settings_come_from_the_shapes(converted):
    published = json.loads((OFFICIAL / "official_tiny.json").read_text())
    checkpoint = torch.load(converted, weights_only=True)
    hp = checkpoint["hyper_parameters"]
    image, text = hp["image_encoder"]["init_args"], hp["text_encoder"]["init_args"]
    pi, pt = published["image"], published["text"]
    assert (image["img_size"], image["patch_size"], image["width"], image["depth"], image["head_size"]) == (
        pi["img_size"], pi["patch_size"], pi["embed_dims"], pi["depth"], pi["head_size"])
    assert image["mlp_ratio"] == pi["hidden_rate"]
    assert (text["vocab_size"], text["width"], text["depth"], text["head_size"], text["ffn_hidden"]) == (
        pt["vocab_size"], pt["n_embd"], pt["n_layer"], pt["head_size"], pt["dim_ffn"])
    assert text["context_length"] == pt["ctx_len"] and text["pooling"] == "published"
    assert hp["_class_path"] == "rwkv_clip.module.CLIPModule" and hp["embed_dim"] is None
    assert "pytorch-lightning_version" in checkpoint
    # The bf16 text decays are stored as float32, with the same values.
    for key, dtype in published["dtypes"].items():
        assert dtype == "torch.bfloat16"
        ours = key.replace("module.text_model.", "text_encoder.")
        assert checkpoint["state_dict"][ours].dtype == torch.float32


@needs_official
def test_key_map_and_wrapper_prefixes(official):
    state = rename_official(official)
    assert set(state) >= {"logit_scale", "image_encoder.patch_embed.weight", "image_encoder.pos_embed",
                          "image_encoder.blocks.1.ffn.time_maa_k", "image_encoder.ln_out.weight",
                          "text_encoder.emb.weight", "text_encoder.blocks.1.att.time_decay"}
    assert torch.equal(state["image_encoder.blocks.0.ffn.time_maa_r"],
                       official["module.image_model.layers.0.ffn.spatial_mix_r"])
    assert torch.equal(state["image_encoder.ln_out.bias"], official["module.image_model.ln1.bias"])
    # No DDP prefix, or torch.compile's _orig_mod. anywhere: the same state_dict.
    bare = {k.removeprefix("module."): v for k, v in official.items()}
    compiled = {k.replace("module.image_model.", "module._orig_mod.image_model._orig_mod."): v for k, v in official.items()}
    for variant in (bare, compiled):
        other = rename_official(variant)
        assert other.keys() == state.keys() and all(torch.equal(other[k], state[k]) for k in state)
    assert all(isinstance(rule, tuple) and len(rule) == 2 for rule in KEY_RULES)


@needs_official
def test_wrong_keys_are_listed_with_what_was_expected(official, tmp_path, capsys):
    extra = dict(official)
    extra["module.image_model.cls_token"] = torch.zeros(1, 1, 320)
    del extra["module.text_model.blocks.1.att.gate.weight"]
    torch.save(extra, tmp_path / "odd.pt")
    with pytest.raises(ValueError) as err:
        load_model(tmp_path / "odd.pt")
    message = str(err.value)
    assert "missing keys: 1 (text_encoder.blocks.1.att.gate.weight)" in message
    assert "unexpected keys: 1 (image_encoder.cls_token)" in message
    assert "image_model.patch_embed.projection.weight" in message  # what an official file should hold
    from rwkv_clip.convert import main  # the converter refuses it too: exit status 1, one line, no traceback

    assert main([str(tmp_path / "odd.pt"), str(tmp_path / "odd.ckpt"), "--tokenizer", "null"]) == 1
    assert "unexpected keys" in capsys.readouterr().err
    assert not (tmp_path / "odd.ckpt").exists()


def test_files_of_neither_format_get_a_clear_error(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a Lightning checkpoint.*nor an official RWKV-CLIP"):
        load_model(tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*notes.txt"):
        load_model(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path / "missing.pt")


class NotATensor:  # a pickled object: weights_only refuses to build it, so no code in the file runs
    pass


def test_files_are_read_with_weights_only(tmp_path):
    torch.save({"state_dict": {}, "payload": NotATensor()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_model(tmp_path / "pickled.ckpt")


def test_settings_errors_name_the_missing_tensor():
    with pytest.raises(ValueError, match="image_encoder.patch_embed.weight"):
        tower_specs({"text_encoder.emb.weight": torch.zeros(4, 4)})


@needs_official
def test_a_clip_tokenizer_needs_clips_vocabulary(official):
    with pytest.raises(ValueError, match="4096 tokens.*49408"):
        official_to_checkpoint(official, tokenizer="clip")


# ---------------------------------------------------------------------------- through main.py, as a user runs it
def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def demo_224(tmp_path_factory) -> Path:
    """Demo data at 224 px with a small tokenizer, whose ids fit the 4096-token official tiny model."""
    from rwkv_clip.datamodules import ensure_demo_data

    root = tmp_path_factory.mktemp("demo224")
    ensure_demo_data(str(root), num_train=8, num_val=8, num_test_per_class=1, shapes=["circle", "square"],
                     colours=["red", "blue"], vocab_size=300)
    return root


def data_config(root: Path, tmp_path: Path) -> Path:
    config = tmp_path / "data.yaml"
    config.write_text(f"""
data:
  class_path: rwkv_clip.datamodules.ImageTextDataModule
  init_args:
    train_dir: {root / 'train'}
    val_dir: {root / 'val'}
    tokenizer: {root / 'tokenizer.json'}
    image_size: 224
    batch_size: 4
    num_workers: 0
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
""")
    return config


@needs_official
def test_convert_command_then_main_validate_without_a_model_config(demo_224, tmp_path):
    """The command line converts, and `main.py validate --ckpt_path` rebuilds the model from the checkpoint."""
    out = tmp_path / "tiny.ckpt"
    proc = run("-m", "rwkv_clip.convert", str(OFFICIAL / "official_tiny.pt"), str(out), "--tokenizer", "null", cwd=tmp_path)
    assert "wrote" in proc.stdout and out.is_file()
    proc = run(str(REPO / "main.py"), "validate", "--config", str(data_config(demo_224, tmp_path)),
               "--ckpt_path", str(out), cwd=tmp_path)
    assert "val/loss" in proc.stdout
    # An official file given to --ckpt_path is refused with the way out.
    from rwkv_clip.cli import main

    with pytest.raises(SystemExit, match="python -m rwkv_clip.convert"):
        main(["validate", "--config", str(data_config(demo_224, tmp_path)), "--ckpt_path",
              str(OFFICIAL / "official_tiny.pt")])


@needs_official
def test_main_fit_fine_tunes_from_the_official_file_with_a_locked_image_tower(demo_224, official, tmp_path):
    """`fit` starts from the official weights (a fresh optimizer), LiT-style: the locked image tower leaves the
    run bit-identical, the text tower trains."""
    spec = official_to_checkpoint(official, tokenizer=None)["hyper_parameters"]
    model = tmp_path / "model.yaml"
    model.write_text(json.dumps({"model": {"class_path": "rwkv_clip.module.CLIPModule", "init_args": {
        "image_encoder": spec["image_encoder"], "text_encoder": spec["text_encoder"],
        "pretrained_path": str(OFFICIAL / "official_tiny.pt"), "lock_image": True, "lr": 1e-3}}}))
    out = tmp_path / "ckpts"
    run(str(REPO / "main.py"), "fit", "--config", str(data_config(demo_224, tmp_path)), "--config", str(model),
        "--trainer.max_steps=2", "--trainer.enable_checkpointing=true", "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={out}", cwd=tmp_path)
    saved = sorted(out.rglob("*.ckpt"))
    assert saved, list(out.rglob("*"))
    checkpoint = torch.load(saved[-1], weights_only=True)
    assert checkpoint["global_step"] == 2
    start = rename_official(official)
    state = checkpoint["state_dict"]
    image_keys = [k for k in start if k.startswith("image_encoder.")]
    assert all(torch.equal(state[k], start[k]) for k in image_keys)  # locked: bit-identical
    changed = [k for k in start if k.startswith("text_encoder.") and not torch.equal(state[k], start[k])]
    assert changed  # trained
    # From the official weights, not from a fresh init: two small steps stay close to them.
    assert all((state[k] - start[k]).abs().max() < 0.05 for k in changed)
    n_params = sum(len(g["params"]) for g in checkpoint["optimizer_states"][0]["param_groups"])
    n_trainable = len([k for k in start if not k.startswith("image_encoder.")])
    assert n_params == n_trainable  # the locked tower is left out of the optimizer
