"""main.py (LightningCLI) with the published configs, on a tiny generated dataset."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rwkv_clip import load_model
from rwkv_clip.cli import main
from rwkv_clip.datamodules import ensure_demo_data
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


@pytest.mark.parametrize("config", ["rwkv_clip_b32.yaml", "rwkv_clip_b16.yaml"])
def test_published_config_fast_dev_run(config, tiny_data, tmp_path):
    run_main("fit", "--config", str(REPO / "configs" / config), "--trainer.fast_dev_run=1",
             *data_overrides(tiny_data), cwd=tmp_path)


def test_published_config_describes_the_paper_recipe():
    cfg = yaml.safe_load((REPO / "configs" / "rwkv_clip_b32.yaml").read_text())
    model, trainer = cfg["model"]["init_args"], cfg["trainer"]
    assert trainer["precision"] == "bf16-mixed" and trainer["gradient_clip_val"] == 1.0
    assert model["lr"] == 1e-3 and model["weight_decay"] == 0.2 and model["betas"] == [0.9, 0.98]
    # torch's OneCycleLR(max_lr=1e-3, pct_start=0.1) with its defaults, AdamW's default eps, bilinear crops.
    assert model["scheduler"] == "onecycle" and model["warmup"] == 0.1 and model["eps"] == 1e-8
    assert cfg["data"]["init_args"]["interpolation"] == "bilinear"
    image, text = model["image_encoder"]["init_args"], model["text_encoder"]["init_args"]
    assert (image["img_size"], image["patch_size"], image["width"], image["depth"], image["head_size"]) == (224, 32, 640, 12, 80)
    assert (text["width"], text["depth"], text["head_size"], text["ffn_hidden"], text["vocab_size"]) == (640, 6, 64, 2240, 49408)


def test_fit_saves_config_and_a_checkpoint_that_load_model_rebuilds(tiny_data, tmp_path):
    """A short run with small towers: the run directory gets config.yaml, and the checkpoint alone rebuilds
    the model through load_model (weights_only)."""
    small = [
        "--model.init_args.image_encoder.init_args.width=32", "--model.init_args.image_encoder.init_args.depth=2",
        "--model.init_args.image_encoder.init_args.head_size=16", "--model.init_args.text_encoder.init_args.width=32",
        "--model.init_args.text_encoder.init_args.depth=2", "--model.init_args.text_encoder.init_args.head_size=16",
        "--model.init_args.text_encoder.init_args.ffn_hidden=64", "--model.init_args.text_encoder.init_args.vocab_size=300",
        "--model.init_args.image_encoder.init_args.img_size=64", "--data.init_args.image_size=64",
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
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(1, 300, (2, 10))
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
