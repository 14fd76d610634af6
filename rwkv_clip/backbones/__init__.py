"""Image and text towers. Every tower maps its input to pooled features ``(B, width)`` and has a ``width``."""

from rwkv_clip.backbones.utils import padding_mask
