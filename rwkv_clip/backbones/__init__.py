"""Image and text towers. Every tower maps its input to pooled features ``(B, width)`` and has a ``width``.

| tower           | input              | file           |
|-----------------|--------------------|----------------|
| VisionRWKV      | images (B,3,H,W)   | rwkv.py        |
| TextRWKV        | token ids (B,L)    | rwkv.py        |
| TimmViT         | images (B,3,H,W)   | vit.py         |
| TextTransformer | token ids (B,L)    | transformer.py |

Every tower also has timm's ``no_weight_decay()`` and ``set_grad_checkpointing()``. Named settings (the published
towers, the ablations' baselines, the demo's) are built with ``create_tower(name)``; ``list_towers()`` names them.
"""

from rwkv_clip.backbones.registry import create_tower, list_towers, tower_config
from rwkv_clip.backbones.rwkv import TextRWKV, VisionRWKV
from rwkv_clip.backbones.transformer import TextTransformer
from rwkv_clip.backbones.utils import padding_mask
from rwkv_clip.backbones.vit import TimmViT

__all__ = ["VisionRWKV", "TextRWKV", "TimmViT", "TextTransformer", "padding_mask", "create_tower", "list_towers",
           "tower_config"]
