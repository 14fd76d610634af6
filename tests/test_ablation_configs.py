"""Every architecture-ablation config trains one step under `main.py fit --trainer.fast_dev_run 1`.

The configs run as written (model and trainer sections untouched). Only the data changes: everything points
at one tiny generated demo set in a temporary directory (the full-size configs read YFCC15M, which is not here,
so they get the demo data module at their own image size and context length with batch 2).
"""

from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "configs" / "ablations"
FULL = ["rwkv_rwkv", "vit_transformer", "vit_rwkv", "rwkv_transformer"]
DEMO = [f"demo_{name}" for name in FULL]
IMAGE = {"rwkv": "rwkv_clip.backbones.VisionRWKV", "vit": "rwkv_clip.backbones.TimmViT"}
TEXT = {"rwkv": "rwkv_clip.backbones.TextRWKV", "transformer": "rwkv_clip.backbones.TextTransformer"}
# The generation parameters of the tiny demo set; every config gets exactly these so nothing regenerates.
TINY_DEMO = dict(num_train=16, num_val=4, num_test_per_class=1, data_image_size=32, data_seed=0)


def load(name: str) -> dict:
    path = ABLATIONS / f"{name}.yaml"
    if not path.is_file():
        pytest.fail(f"missing ablation config {path}")
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("demo_data") / "demo")


def _point_at(node, old: str, new: str):
    """Replace every string ``old`` (the demo data root) in a config tree, e.g. in eval callbacks' datasets."""
    if isinstance(node, dict):
        return {k: _point_at(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_point_at(v, old, new) for v in node]
    return new if node == old else node


def tiny_data_config(cfg: dict, root: str) -> dict:
    data = cfg["data"]
    if data["class_path"].endswith("DemoDataModule"):
        old_root = data["init_args"].get("root", "data/demo")
        cfg = _point_at(cfg, old_root, root)
        args = cfg["data"]["init_args"]
        args.update(TINY_DEMO, batch_size=2, num_workers=0)
        return cfg
    # Full-size config: the demo module at the config's own image size / context length.
    model = cfg["model"]["init_args"]
    image_size = model["image_encoder"]["init_args"].get("img_size", 224)
    context = model["text_encoder"]["init_args"]["context_length"]
    cfg["data"] = {
        "class_path": "rwkv_clip.datamodules.DemoDataModule",
        "init_args": dict(root=root, image_size=image_size, context_length=context, batch_size=2, num_workers=0,
                          **TINY_DEMO),
    }
    return cfg


@pytest.mark.parametrize("name", FULL + DEMO)
def test_config_pairs_the_right_towers(name):
    cfg = load(name)
    image_kind, text_kind = name.removeprefix("demo_").split("_")
    model = cfg["model"]["init_args"]
    assert cfg["model"]["class_path"] == "rwkv_clip.module.CLIPModule"
    assert model["image_encoder"]["class_path"] == IMAGE[image_kind]
    assert model["text_encoder"]["class_path"] == TEXT[text_kind]
    if name.startswith("demo_"):
        assert cfg["data"]["class_path"] == "rwkv_clip.datamodules.DemoDataModule"


@pytest.mark.parametrize("group", [FULL, DEMO], ids=["full", "demo"])
def test_configs_have_about_equal_parameter_counts(group):
    """Counted on each config's model with its towers from the registry (test_registry checks they are the
    config's towers)."""
    from rwkv_clip.backbones import create_tower
    from rwkv_clip.module import CLIPModule
    from test_registry import CONFIG_TOWERS

    counts = {}
    for name in group:
        image, text = CONFIG_TOWERS[f"configs/ablations/{name}.yaml"]
        settings = {k: v for k, v in load(name)["model"]["init_args"].items() if k not in ("image_encoder", "text_encoder")}
        with torch.device("meta"):  # shapes only: the full-size towers take seconds to initialise
            model = CLIPModule(create_tower(image), create_tower(text), **settings)
        counts[name] = sum(p.numel() for p in model.parameters())
    lo, hi = min(counts.values()), max(counts.values())
    assert hi / lo < 1.1, f"parameter counts differ by more than 10%: {counts}"


@pytest.mark.parametrize("name", DEMO + [pytest.param(n, marks=pytest.mark.slow) for n in FULL])
def test_fast_dev_run(name, demo_root, tmp_path):
    """Demo configs: ~15 s each; full-size (~150M parameters, marked slow): ~1 min each on 2 busy cores."""
    from rwkv_clip.cli import main

    cfg = tiny_data_config(load(name), demo_root)
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    cli = main(["fit", "--config", str(cfg_path), "--trainer.fast_dev_run", "1",
                "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    trainer, model = cli.trainer, cli.model
    assert trainer.state.finished and trainer.global_step == 1
    loss = trainer.callback_metrics.get("train/loss", trainer.callback_metrics.get("train_loss"))
    if loss is not None:
        assert torch.isfinite(loss)
    for p in model.parameters():
        assert torch.isfinite(p).all()
