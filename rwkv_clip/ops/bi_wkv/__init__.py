"""Bi-WKV operator: pure-PyTorch reference, C++ CPU kernel and CUDA kernel behind bi_wkv()."""
from .interface import BACKENDS, bi_wkv
from .reference import bi_wkv_reference

__all__ = ["BACKENDS", "bi_wkv", "bi_wkv_reference"]
