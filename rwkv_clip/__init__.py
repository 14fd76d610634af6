"""RWKV-CLIP: CLIP-style vision-language models with bidirectional RWKV towers, on PyTorch Lightning."""

from rwkv_clip.inference import load_model
from rwkv_clip.module import CLIPModule

__all__ = ["CLIPModule", "load_model"]
__version__ = "0.1.0"
