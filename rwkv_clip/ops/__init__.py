"""Custom operators. `from rwkv_clip.ops import bi_wkv`."""
from .bi_wkv import bi_wkv, bi_wkv_reference

__all__ = ["bi_wkv", "bi_wkv_reference"]
