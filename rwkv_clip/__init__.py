"""RWKV-CLIP: CLIP-style vision-language models with bidirectional RWKV towers, on PyTorch Lightning."""

__all__ = ["CLIPModule", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use, so command-line tools that need no torch (rwkv_clip.describe) start at once.
    if name == "CLIPModule":
        from rwkv_clip.module import CLIPModule

        return CLIPModule
    if name == "load_model":
        from rwkv_clip.inference import load_model

        return load_model
    raise AttributeError(f"module 'rwkv_clip' has no attribute {name!r}")
