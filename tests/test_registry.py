"""The tower registry (rwkv_clip/backbones/registry.py) and the interface every tower shares."""

from pathlib import Path

import pytest
import torch

from rwkv_clip.backbones import TextRWKV, TextTransformer, TimmViT, VisionRWKV, create_tower, list_towers, tower_config
from rwkv_clip.backbones import rwkv, transformer

ROOT = Path(__file__).resolve().parents[1]
# The towers of each published / ablation config, by registry name: (image tower, text tower).
CONFIG_TOWERS = {
    "configs/rwkv_clip_b32.yaml": ("vision_rwkv_b32", "text_rwkv_b32"),
    "configs/rwkv_clip_b16.yaml": ("vision_rwkv_b16", "text_rwkv_b16"),
    "configs/demo.yaml": ("vision_rwkv_demo", "text_rwkv_demo"),
    "configs/ablations/rwkv_rwkv.yaml": ("vision_rwkv_b32", "text_rwkv_b32"),
    "configs/ablations/rwkv_transformer.yaml": ("vision_rwkv_b32", "text_transformer_b32"),
    "configs/ablations/vit_rwkv.yaml": ("vit_b32", "text_rwkv_b32"),
    "configs/ablations/vit_transformer.yaml": ("vit_b32", "text_transformer_b32"),
    "configs/ablations/demo_rwkv_rwkv.yaml": ("vision_rwkv_demo", "text_rwkv_demo"),
    "configs/ablations/demo_rwkv_transformer.yaml": ("vision_rwkv_demo", "text_transformer_demo"),
    "configs/ablations/demo_vit_rwkv.yaml": ("vit_demo", "text_rwkv_demo"),
    "configs/ablations/demo_vit_transformer.yaml": ("vit_demo", "text_transformer_demo"),
}
CLASSES = {"VisionRWKV": VisionRWKV, "TextRWKV": TextRWKV, "TimmViT": TimmViT, "TextTransformer": TextTransformer}


def config_stack(path: str) -> list[str]:
    """The configs main.py stacks for ``path``: an ablation is an overlay on its base recipe."""
    if "/ablations/" not in path:
        return [str(ROOT / path)]
    base = "configs/demo.yaml" if Path(path).name.startswith("demo_") else "configs/rwkv_clip_b32.yaml"
    return [str(ROOT / base), str(ROOT / path)]


@pytest.mark.parametrize("path", sorted(CONFIG_TOWERS))
def test_config_towers_are_the_registry_entries(path):
    """Each config, resolved as main.py resolves it (overlays stacked, numbers linked from the data), builds the
    registry's towers: the entry's settings, and the same parameters."""
    from lightning.pytorch.cli import instantiate_class

    from rwkv_clip.cli import parse_config

    full = "demo" not in path
    if full:
        pytest.importorskip("open_clip")  # CLIP's BPE (49408 tokens) in place of the data/ file the config names
    config = parse_config(*config_stack(path), args=["--data.init_args.tokenizer=clip"] if full else [])
    for key, name in zip(("image_encoder", "text_encoder"), CONFIG_TOWERS[path]):
        node, entry = config.model.init_args[key].as_dict(), tower_config(name)
        assert node["class_path"] == entry["class_path"], (path, key)
        assert {k: node["init_args"].get(k) for k in entry["init_args"]} == entry["init_args"], (path, key)
        with torch.device("meta"):  # shapes only
            built, named = instantiate_class((), node), create_tower(name)
        assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in named.state_dict().items()}


def test_every_tower_builds_by_name_with_its_settings():
    assert list_towers() == sorted(list_towers()) and len(list_towers()) == 10
    for name in list_towers():
        config = tower_config(name)
        with torch.device("meta"):  # shapes only: the B-size towers take seconds to initialise
            tower = create_tower(name)
        assert type(tower) is CLASSES[config["class_path"].rpartition(".")[2]], name
        assert config["class_path"] == f"rwkv_clip.backbones.{type(tower).__name__}"
        args = config["init_args"]
        if "width" in args:
            assert tower.width == args["width"], name
    b32 = tower_config("vision_rwkv_b32")["init_args"]
    assert (b32["width"], b32["depth"], b32["patch_size"], b32["mlp_ratio"]) == (640, 12, 32, 5.0)
    assert tower_config("vision_rwkv_b16")["init_args"]["patch_size"] == 16


def test_overrides_replace_constructor_arguments_and_entries_stay_unchanged():
    tower = create_tower("vision_rwkv_demo", depth=1, drop_path_rate=0.2, grad_checkpointing=True)
    assert len(tower.blocks) == 1 and tower.grad_checkpointing
    assert tower_config("vision_rwkv_demo")["init_args"]["depth"] == 3  # the override did not leak into the registry
    config = tower_config("text_rwkv_demo")
    config["init_args"]["width"] = 1
    assert tower_config("text_rwkv_demo")["init_args"]["width"] == 64


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown tower 'vision_rwkv_b64'.*vision_rwkv_b16, vision_rwkv_b32"):
        create_tower("vision_rwkv_b64")
    with pytest.raises(TypeError, match="no_such_argument"):
        create_tower("text_rwkv_demo", no_such_argument=1)


# ------------------------------------------------------------------------------------------------ the interface

INPUTS = {"vision_rwkv_demo": lambda: torch.randn(2, 3, 32, 32), "vit_demo": lambda: torch.randn(2, 3, 32, 32),
          "text_rwkv_demo": lambda: torch.randint(1, 512, (2, 10)),
          "text_transformer_demo": lambda: torch.randint(1, 512, (2, 10))}


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_set_grad_checkpointing_switches_recomputation(name, monkeypatch):
    """set_grad_checkpointing(True) makes the next training step recompute the blocks; (False) stops it."""
    calls = []
    for module in (rwkv, transformer):  # our towers' block loops call torch's checkpoint through these names
        real = module.checkpoint
        monkeypatch.setattr(module, "checkpoint", lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    torch.manual_seed(0)
    tower = create_tower(name).train()
    x = INPUTS[name]()
    for enable, expect_calls in ((True, True), (False, False)):
        calls.clear()
        tower.set_grad_checkpointing(enable)
        assert tower.grad_checkpointing is enable
        tower(x).square().sum().backward()
        if name == "vit_demo":  # timm's own switch, inside its model
            assert tower.model.grad_checkpointing is enable
        else:
            assert bool(calls) is expect_calls and (not calls or len(calls) == len(tower.blocks))


def test_no_weight_decay_names_real_parameters():
    for name in INPUTS:
        tower = create_tower(name)
        names = tower.no_weight_decay()
        assert names and names <= dict(tower.named_parameters()).keys(), name
    assert "pos_embed" in create_tower("vision_rwkv_demo").no_weight_decay()
    assert create_tower("text_transformer_demo").no_weight_decay() == {"positional_embedding"}
    assert create_tower("vit_demo").no_weight_decay() == {"model.pos_embed", "model.cls_token"}
    text = create_tower("text_rwkv_demo").no_weight_decay()
    assert "blocks.0.att.time_faaaa" in text and "blocks.0.ffn.time_maa_r" in text
    assert not any(n.endswith(("_w1", "_w2")) for n in text)  # the low-rank matrices decay


def test_blocks_take_keyword_arguments_only():
    with pytest.raises(TypeError):
        rwkv.Block(32, 8, 48, 0, 2)
    with pytest.raises(TypeError):
        transformer.Block(32, 4, 4.0)
    block = rwkv.Block(dim=32, head_size=8, hidden=48, layer_id=0, n_layer=2, drop_path=0.1)
    assert block.drop_path.drop_prob == 0.1 and hasattr(block, "ln0")
