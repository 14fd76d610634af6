"""Towers by name: the published RWKV-CLIP towers, the Transformer baselines of the ablations, and the demo's.

    from rwkv_clip.backbones import create_tower, list_towers
    image = create_tower("vision_rwkv_b32")                        # RWKV-CLIP B/32's image tower
    text = create_tower("text_rwkv_b32", grad_checkpointing=True)  # any constructor argument can be overridden

Each entry is the ``{class_path, init_args}`` node a YAML config holds under ``model.init_args.image_encoder`` or
``text_encoder``, so a tower built here is the one the config builds (``tests/test_registry.py`` checks it), and it
is built the same way, with Lightning's ``instantiate_class``.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

_VISION_RWKV = "rwkv_clip.backbones.VisionRWKV"
_TEXT_RWKV = "rwkv_clip.backbones.TextRWKV"
_VIT = "rwkv_clip.backbones.TimmViT"
_TEXT_TRANSFORMER = "rwkv_clip.backbones.TextTransformer"

# RWKV-CLIP's published towers: 640 wide, image 12 blocks with 5x channel mix, text 6 blocks with 3.5x.
_VISION_RWKV_B = dict(img_size=224, width=640, depth=12, head_size=80, mlp_ratio=5.0, drop_path_rate=0.3)
_TEXT_RWKV_B = dict(vocab_size=49408, context_length=77, width=640, depth=6, head_size=64, ffn_hidden=2240,
                    pooling="mean")
# The demo's towers: 64 wide, for 32 px images and a 512-token vocabulary; a CPU trains them in minutes.
_TEXT_DEMO = dict(vocab_size=512, context_length=24, width=64)

TOWERS: dict[str, dict[str, Any]] = {
    # Published RWKV-CLIP (configs/rwkv_clip_b32.yaml, rwkv_clip_b16.yaml); the text tower is the same in both.
    "vision_rwkv_b32": {"class_path": _VISION_RWKV, "init_args": {**_VISION_RWKV_B, "patch_size": 32}},
    "vision_rwkv_b16": {"class_path": _VISION_RWKV, "init_args": {**_VISION_RWKV_B, "patch_size": 16}},
    "text_rwkv_b32": {"class_path": _TEXT_RWKV, "init_args": dict(_TEXT_RWKV_B)},
    "text_rwkv_b16": {"class_path": _TEXT_RWKV, "init_args": dict(_TEXT_RWKV_B)},
    # The ablations' Transformer towers, parameter-matched to the RWKV ones: ViT-B/32 and CLIP's text Transformer.
    "vit_b32": {"class_path": _VIT,
                "init_args": dict(model_name="vit_base_patch32_224", img_size=224, drop_path_rate=0.0)},
    "text_transformer_b32": {"class_path": _TEXT_TRANSFORMER,
                             "init_args": dict(vocab_size=49408, context_length=77, width=512, layers=12, heads=8,
                                               causal=True, pooling="eot")},
    # The demo's (configs/demo.yaml, configs/ablations/demo_*.yaml).
    "vision_rwkv_demo": {"class_path": _VISION_RWKV,
                         "init_args": dict(img_size=32, patch_size=4, width=64, depth=3, head_size=32, mlp_ratio=3.0,
                                           drop_path_rate=0.0)},
    "text_rwkv_demo": {"class_path": _TEXT_RWKV,
                       "init_args": {**_TEXT_DEMO, "depth": 1, "head_size": 32, "ffn_hidden": 192}},
    "vit_demo": {"class_path": _VIT,
                 "init_args": dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=5,
                                   num_heads=2, mlp_ratio=4.0, drop_path_rate=0.0)},
    "text_transformer_demo": {"class_path": _TEXT_TRANSFORMER,
                              "init_args": {**_TEXT_DEMO, "layers": 2, "heads": 2, "mlp_ratio": 4.0, "causal": True,
                                            "pooling": "eot"}},
}


def list_towers() -> list[str]:
    """The names :func:`create_tower` knows, sorted."""
    return sorted(TOWERS)


def tower_config(name: str) -> dict[str, Any]:
    """A copy of the ``{class_path, init_args}`` node of the tower called ``name``, as a YAML config writes it."""
    if name not in TOWERS:
        raise ValueError(f"unknown tower {name!r}; the known towers are: {', '.join(list_towers())}")
    return copy.deepcopy(TOWERS[name])


def create_tower(name: str, **overrides: Any) -> nn.Module:
    """The tower called ``name`` (see :func:`list_towers`), with ``overrides`` replacing its constructor arguments."""
    from lightning.pytorch.cli import instantiate_class  # here: importing the towers alone needs no Lightning

    config = tower_config(name)
    config["init_args"].update(overrides)
    return instantiate_class((), config)
