"""The architecture ablations are overlays on one base recipe (`--config BASE --config OVERLAY`, as main.py stacks
them): each changes only the towers and the projection they need, the four pairings of a size have about equal
parameter counts, and each trains a step under `main.py fit --trainer.fast_dev_run 1`.

The configs are read as main.py reads them (rwkv_clip.cli.parse_config: overlays, links), never as YAML literals.
The full-size base reads YFCC15M and CLIP's BPE from data/, which are not here: it is parsed with CLIP's merges
from open_clip (`--data.init_args.tokenizer=clip`, the same 49408 tokens), and trained on the tiny demo set.
"""

from pathlib import Path

import pytest
import torch
import yaml

from rwkv_clip.cli import main, parse_config

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "configs" / "ablations"
FULL = ["rwkv_rwkv", "vit_transformer", "vit_rwkv", "rwkv_transformer"]
DEMO = [f"demo_{name}" for name in FULL]
IMAGE = {"rwkv": "rwkv_clip.backbones.VisionRWKV", "vit": "rwkv_clip.backbones.TimmViT"}
TEXT = {"rwkv": "rwkv_clip.backbones.TextRWKV", "transformer": "rwkv_clip.backbones.TextTransformer"}
# What an overlay may change: the towers, the projection, and the run's name.
OVERLAY_KEYS = ("model.init_args.image_encoder", "model.init_args.text_encoder", "model.init_args.embed_dim",
                "trainer.logger.init_args.name")
# The generation parameters of the tiny demo set; every config gets exactly these so nothing regenerates.
TINY_DEMO = dict(num_train=16, num_val=4, num_test_per_class=1, data_image_size=32, data_seed=0)


def base(name: str) -> Path:
    return ROOT / "configs" / ("demo.yaml" if name.startswith("demo_") else "rwkv_clip_b32.yaml")


def overlay(name: str) -> Path:
    path = ABLATIONS / f"{name}.yaml"
    if not path.is_file():
        pytest.fail(f"missing ablation config {path}")
    return path


def parse(*configs: Path, full: bool):
    if full:
        pytest.importorskip("open_clip")  # the tokenizer `clip`
    return parse_config(*map(str, configs), args=["--data.init_args.tokenizer=clip"] if full else [])


def flatten(node, prefix: str = "") -> dict:
    if hasattr(node, "as_dict"):
        node = node.as_dict()
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: node}


@pytest.mark.parametrize("name", FULL + DEMO)
def test_config_pairs_the_right_towers(name):
    cfg = parse(base(name), overlay(name), full=name in FULL)
    image_kind, text_kind = name.removeprefix("demo_").split("_")
    model = cfg.model.init_args
    assert cfg.model.class_path == "rwkv_clip.module.CLIPModule"
    assert model.image_encoder.class_path == IMAGE[image_kind]
    assert model.text_encoder.class_path == TEXT[text_kind]
    if name.startswith("demo_"):
        assert cfg.data.class_path == "rwkv_clip.datamodules.DemoDataModule"
    # Whatever the towers, they are built for the base's data.
    data = cfg.data.init_args
    assert model.image_encoder.init_args.img_size == data.image_size
    assert model.text_encoder.init_args.context_length == data.context_length
    assert model.text_encoder.init_args.vocab_size == (512 if name in DEMO else 49408)


@pytest.mark.parametrize("name", FULL + DEMO)
def test_an_overlay_changes_only_the_towers(name):
    """Against its base, an overlay changes only the towers it swaps (and the projection), nothing of the data,
    the recipe or the trainer; and the overlay file holds nothing else."""
    full = name in FULL
    before, after = flatten(parse(base(name), full=full)), flatten(parse(base(name), overlay(name), full=full))
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} - {"config"}  # the files
    assert changed and all(k.startswith(OVERLAY_KEYS) for k in changed), sorted(changed)
    assert "trainer.logger.init_args.name" in changed  # each pairing logs under its own name
    image_kind, text_kind = name.removeprefix("demo_").split("_")
    assert any(k.startswith("model.init_args.image_encoder") for k in changed) == (image_kind != "rwkv")
    assert any(k.startswith("model.init_args.text_encoder") for k in changed) == (text_kind != "rwkv")
    written = flatten(yaml.safe_load(overlay(name).read_text()))
    assert all(k.startswith(OVERLAY_KEYS) for k in written), sorted(written)


@pytest.mark.parametrize("group", [FULL, DEMO], ids=["full", "demo"])
def test_configs_have_about_equal_parameter_counts(group):
    """Each model built as LightningCLI builds it (instantiate_class), from the resolved config."""
    from lightning.pytorch.cli import instantiate_class

    from rwkv_clip.module import CLIPModule

    counts = {}
    for name in group:
        settings = parse(base(name), overlay(name), full=name in FULL).model.init_args.as_dict()
        with torch.device("meta"):  # shapes only: the full-size towers take seconds to initialise
            image, text = (instantiate_class((), settings.pop(k)) for k in ("image_encoder", "text_encoder"))
            counts[name] = sum(p.numel() for p in CLIPModule(image, text, **settings).parameters())
    lo, hi = min(counts.values()), max(counts.values())
    assert hi / lo < 1.1, f"parameter counts differ by more than 10%: {counts}"


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


def tiny_data_overlay(name: str, root: str) -> dict:
    """A third config that moves the run onto the tiny demo set. The demo configs keep their callbacks (pointed at
    the tiny set); the full-size ones get the demo data module at their own image size and context length, and no
    checkpoint callback (a B/32 checkpoint is ~1.8 GB)."""
    data = {"class_path": "rwkv_clip.datamodules.DemoDataModule",
            "init_args": dict(root=root, batch_size=2, num_workers=0, torch_threads=None, **TINY_DEMO)}
    if name in DEMO:
        callbacks = yaml.safe_load(base(name).read_text())["trainer"]["callbacks"]
        return {"data": data, "trainer": {"callbacks": _point_at(callbacks, "data/demo", root)}}
    return {"data": data, "trainer": {"callbacks": [], "enable_checkpointing": False}}


@pytest.mark.parametrize("name", DEMO + [pytest.param(n, marks=pytest.mark.slow) for n in FULL])
def test_fast_dev_run(name, demo_root, tmp_path):
    """Demo configs: ~15 s each; full-size (~150M parameters, marked slow): ~1 min each on 2 busy cores."""
    tiny = tmp_path / "tiny_data.yaml"
    tiny.write_text(yaml.safe_dump(tiny_data_overlay(name, demo_root)))
    torch.manual_seed(0)
    cli = main(["fit", "--config", str(base(name)), "--config", str(overlay(name)), "--config", str(tiny),
                "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.enable_progress_bar", "false"])
    trainer, model = cli.trainer, cli.model
    assert trainer.state.finished and trainer.global_step == 1
    assert model.image_encoder.img_size == cli.datamodule.image_size
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert not list(tmp_path.rglob("*.ckpt"))
