"""Custom operators. `from rwkv_clip.ops import bi_wkv, rwkv6_mix`."""
from . import rwkv6_mix
from .bi_wkv import bi_wkv, bi_wkv_reference

__all__ = ["bi_wkv", "bi_wkv_reference", "rwkv6_mix"]
