"""main.py (LightningCLI) with the published configs, on a tiny generated dataset."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rwkv_clip import load_model
from rwkv_clip.cli import main, parse_config
from rwkv_clip.datamodules import ensure_demo_data
from rwkv_clip.tokenizer import Tokenizer
from tiny_run import TINY_DATA, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    ensure_demo_data(str(root), num_train=16, num_val=8, num_test_per_class=1, shapes=["circle", "square"],
                     colours=["red", "blue"], vocab_size=300)
    return root


def run_main(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def data_overrides(root: Path) -> list[str]:
    return [
        f"--data.init_args.train_dir={root / 'train'}", f"--data.init_args.val_dir={root / 'val'}",
        f"--data.init_args.tokenizer={root / 'tokenizer.json'}", "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
    ]


# A fast_dev_run writes no checkpoint: the published configs' ModelCheckpoint (save_last) would write ~1.8 GB.
NO_CHECKPOINTS = ["--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"]


@pytest.mark.parametrize("config", ["rwkv_clip_b32.yaml", "rwkv_clip_b16.yaml"])
def test_published_config_fast_dev_run(config, tiny_data, tmp_path):
    run_main("fit", "--config", str(REPO / "configs" / config), "--trainer.fast_dev_run=1", *NO_CHECKPOINTS,
             *data_overrides(tiny_data), cwd=tmp_path)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_published_config_describes_the_paper_recipe():
    """The model and data that configs/rwkv_clip_b32.yaml builds, with CLIP's BPE as its tokenizer."""
    pytest.importorskip("open_clip")  # the tokenizer `clip`: CLIP's merges, as shipped by open_clip
    cfg = parse_config(str(REPO / "configs" / "rwkv_clip_b32.yaml"), args=["--data.init_args.tokenizer=clip"])
    model, trainer = cfg.model.init_args, cfg.trainer
    assert trainer.precision == "bf16-mixed" and trainer.gradient_clip_val == 1.0
    assert model.lr == 1e-3 and model.weight_decay == 0.2 and list(model.betas) == [0.9, 0.98]
    # torch's OneCycleLR(max_lr=1e-3, pct_start=0.1) with its defaults, AdamW's default eps, bilinear crops.
    assert model.scheduler == "onecycle" and model.warmup == 0.1 and model.eps == 1e-8
    assert cfg.data.init_args.interpolation == "bilinear"
    image, text = model.image_encoder.init_args, model.text_encoder.init_args
    # img_size, vocab_size and context_length come from the data section (the image size, CLIP's tokenizer).
    assert (image.img_size, image.patch_size, image.width, image.depth, image.head_size) == (224, 32, 640, 12, 80)
    assert (text.width, text.depth, text.head_size, text.ffn_hidden, text.vocab_size) == (640, 6, 64, 2240, 49408)
    assert text.context_length == cfg.data.init_args.context_length == 77


def test_fit_saves_config_and_a_checkpoint_that_load_model_rebuilds(tiny_data, tmp_path):
    """A short run with small towers: the run directory gets config.yaml, and the checkpoint alone rebuilds
    the model through load_model (weights_only)."""
    small = [
        "--model.init_args.image_encoder.init_args.width=32", "--model.init_args.image_encoder.init_args.depth=2",
        "--model.init_args.image_encoder.init_args.head_size=16", "--model.init_args.text_encoder.init_args.width=32",
        "--model.init_args.text_encoder.init_args.depth=2", "--model.init_args.text_encoder.init_args.head_size=16",
        "--model.init_args.text_encoder.init_args.ffn_hidden=64", "--data.init_args.image_size=64",
    ]
    run_main("fit", "--config", str(REPO / "configs" / "rwkv_clip_b32.yaml"), *small, *data_overrides(tiny_data),
             "--trainer.max_steps=2", "--trainer.precision=32-true", "--trainer.logger.init_args.save_dir=logs",
             cwd=tmp_path)
    run_dir = tmp_path / "logs" / "rwkv_clip_b32" / "version_0"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["image_encoder"]["init_args"]["width"] == 32
    checkpoints = sorted(run_dir.glob("checkpoints/*.ckpt"))
    assert checkpoints, list(run_dir.rglob("*"))
    model = load_model(checkpoints[-1])
    assert model.image_encoder.width == 32 and not model.training
    # The towers were built with the data's numbers, and the checkpoint rebuilds them so.
    vocab = Tokenizer.load(str(tiny_data / "tokenizer.json")).vocab_size
    assert model.text_encoder.emb.num_embeddings == vocab and model.text_encoder.context_length == 77
    assert model.image_encoder.img_size == 64
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(1, vocab, (2, 10))
    with torch.no_grad():
        image_emb, text_emb = model(images, tokens)
    assert image_emb.shape == text_emb.shape == (2, 32)
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(2), atol=1e-5)


# ------------------------------------------------------------------------ a checkpoint never changes the model
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict, Path]:
    """A tiny run (one step, image tower depth 2) through main.py in this process: its config and checkpoint."""
    root = tmp_path_factory.mktemp("ckpt_run")
    ensure_demo_data(str(root / "data"), num_train=8, num_val=4, **TINY_DATA)
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(root / "checkpoints"), "filename": "tiny"}}
    # default_root_dir: the run's config.yaml goes there, not into the working directory.
    config = tiny_config(root / "data", 8, 4, max_steps=1, limit_val_batches=0, default_root_dir=str(root),
                         callbacks=[checkpoint])
    config["data"]["init_args"]["torch_threads"] = None  # keep this process's thread count
    (root / "fit.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(root / "fit.yaml")])
    return config, root / "checkpoints" / "tiny.ckpt"


def _write(config: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_config_that_differs_from_the_checkpoint_is_an_error_naming_each_setting(trained, tmp_path, capsys):
    config, ckpt = trained
    deeper = copy.deepcopy(config)
    deeper["model"]["init_args"]["image_encoder"]["init_args"]["depth"] = 3
    with pytest.raises(SystemExit):
        main(["fit", "--config", _write(deeper, tmp_path / "c.yaml"), "--ckpt_path", str(ckpt),
              "--model.init_args.lr=0.1"])
    err = capsys.readouterr().err
    assert "model.init_args.image_encoder.init_args.depth: 3 in the config, 2 in the checkpoint" in err
    assert "model.init_args.lr: 0.1 in the config, 0.003 in the checkpoint" in err
    # Only these two: warmup was given but matches, weight_decay differs from nothing the user gave.
    assert sum(line.startswith("  model.") for line in err.splitlines()) == 2


def test_config_without_a_model_takes_the_checkpoints(trained, tmp_path):
    """`main.py validate --config <eval config> --ckpt_path X.ckpt`, where the eval config has no model section."""
    config, ckpt = trained
    no_model = {k: v for k, v in config.items() if k != "model"}
    cli = main(["validate", "--config", _write(no_model, tmp_path / "eval.yaml"), "--ckpt_path", str(ckpt)])
    assert len(cli.model.image_encoder.blocks) == 2 and cli.model.lr == 3e-3
    assert cli.config["validate"]["model"]["init_args"]["image_encoder"]["init_args"]["depth"] == 2


def test_settings_of_how_not_what_may_differ_from_the_checkpoint(trained, tmp_path):
    config, ckpt = trained
    cli = main(["validate", "--config", _write(config, tmp_path / "c.yaml"), "--ckpt_path", str(ckpt),
                "--model.init_args.micro_batch_size=2", "--model.init_args.text_encoder.init_args.wkv_backend=auto"])
    assert cli.model.micro_batch_size == 2 and cli.model.text_encoder.blocks[0].att.wkv_backend == "auto"


def test_no_model_and_no_checkpoint_is_refused(trained, tmp_path, capsys):
    config, _ = trained
    no_model = {k: v for k, v in config.items() if k != "model"}
    with pytest.raises(SystemExit):
        main(["validate", "--config", _write(no_model, tmp_path / "eval.yaml")])
    assert "no model section" in capsys.readouterr().err


# ------------------------------------------------------------------------ each number once: the towers take the data's
def _image_text_config(tiny_data: Path) -> dict:
    """A tiny model on ImageTextDataModule: no vocab_size, context_length or img_size in the towers."""
    return {
        "model": {"class_path": "rwkv_clip.module.CLIPModule", "init_args": {
            "image_encoder": {"class_path": "rwkv_clip.backbones.VisionRWKV", "init_args": {
                "patch_size": 4, "width": 32, "depth": 1, "head_size": 16}},
            "text_encoder": {"class_path": "rwkv_clip.backbones.TextRWKV", "init_args": {
                "width": 32, "depth": 1, "head_size": 16, "ffn_hidden": 64}}}},
        "data": {"class_path": "rwkv_clip.datamodules.ImageTextDataModule", "init_args": {
            "train_dir": str(tiny_data / "train"), "val_dir": str(tiny_data / "val"),
            "tokenizer": str(tiny_data / "tokenizer.json"), "context_length": 13, "image_size": 24,
            "batch_size": 2, "num_workers": 0}},
        "trainer": {"logger": False, "enable_progress_bar": False, "enable_model_summary": False},
    }


def test_towers_take_vocabulary_context_and_image_size_from_the_data(tiny_data, tmp_path):
    tokenizer = tiny_data / "small_tokenizer.json"  # a vocabulary far from the towers' default of 49408
    Tokenizer.train(["a red circle", "a blue square", "red", "blue"] * 4, vocab_size=270).save(str(tokenizer))
    config = _image_text_config(tiny_data)
    config["data"]["init_args"]["tokenizer"] = str(tokenizer)
    cli = main(["--config", _write(config, tmp_path / "c.yaml")], run=False)
    vocab = Tokenizer.load(str(tokenizer)).vocab_size
    assert vocab != 49408
    assert cli.model.text_encoder.emb.num_embeddings == vocab == cli.datamodule.vocab_size
    assert cli.model.text_encoder.context_length == 13 and cli.model.image_encoder.img_size == 24
    # The hyperparameters hold the linked numbers: a checkpoint rebuilds the same towers.
    text_args = cli.model.hparams["text_encoder"]["init_args"]
    assert (text_args["vocab_size"], text_args["context_length"]) == (vocab, 13)
    assert cli.model.hparams["image_encoder"]["init_args"]["img_size"] == 24
    # The demo data module trains its tokenizer to its vocab_size; the tower gets that number before it exists.
    demo = {**config, "data": {"class_path": "rwkv_clip.datamodules.DemoDataModule", "init_args": {
        "root": str(tmp_path / "not_generated"), "vocab_size": 345, "context_length": 9, "image_size": 16}}}
    cli = main(["--config", _write(demo, tmp_path / "demo.yaml")], run=False)
    assert cli.model.text_encoder.emb.num_embeddings == 345 and cli.model.text_encoder.context_length == 9
    assert cli.model.image_encoder.img_size == 16 and not (tmp_path / "not_generated").exists()


@pytest.mark.parametrize("tower, setting, value, named", [
    ("text_encoder", "context_length", 77, "data.init_args.context_length"),
    ("text_encoder", "vocab_size", 49408, "data.init_args.tokenizer"),
    ("image_encoder", "img_size", 224, "data.init_args.image_size"),
])
def test_a_tower_setting_that_differs_from_the_data_is_refused_naming_both(tiny_data, tmp_path, capsys, tower,
                                                                            setting, value, named):
    config = _image_text_config(tiny_data)
    config["model"]["init_args"][tower]["init_args"][setting] = value
    with pytest.raises(SystemExit):
        main(["fit", "--config", _write(config, tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert f"model.init_args.{tower}.init_args.{setting}: {value} in the config" in err and named in err, err
    # The same value as the data's is fine (older configs that repeat the numbers keep working).
    config["model"]["init_args"][tower]["init_args"][setting] = {
        "context_length": 13, "img_size": 24, "vocab_size": Tokenizer.load(str(tiny_data / "tokenizer.json")).vocab_size,
    }[setting]
    main(["--config", _write(config, tmp_path / "same.yaml")], run=False)


def test_a_tower_that_cannot_take_the_datas_setting_is_refused_naming_both(tiny_data, tmp_path, capsys):
    config = _image_text_config(tiny_data)
    config["model"]["init_args"]["image_encoder"] = {"class_path": "tiny_towers.TinyImageTower",
                                                     "init_args": {"width": 32}}
    with pytest.raises(SystemExit):
        main(["fit", "--config", _write(config, tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert "data.init_args.image_size gives 24, but tiny_towers.TinyImageTower takes no img_size" in err, err
    assert "model.init_args.image_encoder.init_args.img_size" in err


def test_data_that_do_not_fit_the_checkpoints_model_are_refused(trained, tmp_path, capsys):
    """With --ckpt_path the model is the checkpoint's; data with longer texts than it takes cannot feed it."""
    config, ckpt = trained
    no_model = {k: v for k, v in config.items() if k != "model"}
    no_model["data"] = copy.deepcopy(config["data"])
    no_model["data"]["init_args"]["context_length"] = 20
    with pytest.raises(SystemExit):
        main(["validate", "--config", _write(no_model, tmp_path / "eval.yaml"), "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert ("model.init_args.text_encoder.init_args.context_length: 12 in the checkpoint, but "
            "data.init_args.context_length gives 20") in err, err
    # Data that fit the checkpoint's numbers are fine, and the model keeps them: here larger images (the image
    # tower resamples its position embedding) and shorter texts.
    no_model["data"]["init_args"].update(context_length=10, image_size=24)
    cli = main(["validate", "--config", _write(no_model, tmp_path / "fits.yaml"), "--ckpt_path", str(ckpt)])
    assert cli.model.image_encoder.img_size == 16 and cli.model.text_encoder.context_length == 12
    assert cli.datamodule.image_size == 24


# ------------------------------------------------------------------------ README "Train on your own data"
def test_starter_config_trains_on_your_own_data_with_only_the_paths_changed(tmp_path):
    """The README's steps on a small CSV of pairs: prepare, train a tokenizer, then configs/starter.yaml with only
    the data paths given; one training step logs a finite loss."""
    from PIL import Image

    rows = ["image,text"]
    colours = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (35, 70, 225)}
    (tmp_path / "images").mkdir()
    for i in range(150):
        name, rgb = list(colours.items())[i % 3]
        Image.new("RGB", (40 + i % 7, 36), rgb).save(tmp_path / "images" / f"{i}.jpg")
        rows.append(f"images/{i}.jpg,a {name} picture number {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    my_set = tmp_path / "my_set"
    for command in (["-m", "rwkv_clip.datamodules.prepare", "--inputs", "pairs.csv", "--output_dir", str(my_set),
                     "--val_fraction", "0.1"],
                    ["-m", "rwkv_clip.tokenizer", "train", "--input", str(my_set / "train"), "--vocab-size", "8192",
                     "--output", str(my_set / "tokenizer.json")]):
        proc = subprocess.run([sys.executable, *command], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    threads = torch.get_num_threads()  # the starter sets 1 intra-op thread for the process
    try:
        cli = main(["fit", "--config", str(REPO / "configs" / "starter.yaml"),
                    f"--data.init_args.train_dir={my_set / 'train'}", f"--data.init_args.val_dir={my_set / 'val'}",
                    f"--data.init_args.tokenizer={my_set / 'tokenizer.json'}", "--trainer.fast_dev_run=1",
                    f"--trainer.default_root_dir={tmp_path}"])
    finally:
        torch.set_num_threads(threads)
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert cli.model.text_encoder.emb.num_embeddings == Tokenizer.load(str(my_set / "tokenizer.json")).vocab_size
