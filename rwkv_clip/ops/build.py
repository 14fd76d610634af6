"""Prebuild the bi_wkv extensions into the cache, so the first training step does not wait for a compile.

    python -m rwkv_clip.ops.build                      # C++ CPU kernel (+ CUDA kernel if a GPU is visible)
    python -m rwkv_clip.ops.build --cuda               # also the CUDA kernel without a GPU (sm_80, sm_90 + visible GPUs)
    python -m rwkv_clip.ops.build --cpu false --cuda --verbose
    python -m rwkv_clip.ops.build --cuda false         # CPU only

Set CUDA_HOME if nvcc is not on PATH (e.g. CUDA_HOME=/usr/local/cuda). Exit status 1 if a requested build fails.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

from .bi_wkv._build import cache_root, cuda_archs, get_extension


def build(cpu: bool = True, cuda: Optional[bool] = None, verbose: bool = False) -> bool:
    """Prebuild the bi_wkv extensions into the cache, so the first training step does not wait for a compile.

    Args:
        cpu: build the C++ CPU extension.
        cuda: build the CUDA extension; null (default): only when a GPU is visible. Needs nvcc (CUDA_HOME).
        verbose: show the compiler's commands and output.

    Returns:
        True when every requested build succeeded.
    """
    import torch

    kinds = (["cpu"] if cpu else []) + (["cuda"] if (torch.cuda.is_available() if cuda is None else cuda) else [])
    if not kinds:
        raise ValueError("nothing to build: --cpu false, and --cuda false or no GPU visible")
    print(f"cache: {cache_root()}")
    ok = True
    for kind in kinds:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or ";".join(cuda_archs())
        extra = f" for compute capabilities {archs}" if kind == "cuda" else ""
        print(f"building bi_wkv {kind} extension{extra} ...", flush=True)
        t0 = time.time()
        try:
            mod = get_extension(kind, verbose=verbose)
        except RuntimeError as e:
            print(f"FAILED: {e}", file=sys.stderr)
            ok = False
            continue
        print(f"  ok in {time.time() - t0:.1f}s: {mod.__file__}")
    return ok


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m rwkv_clip.ops.build``: the exit status (0 built, 1 a build failed or nothing to build)."""
    from rwkv_clip.command import run

    return run(build, argv, prog="python -m rwkv_clip.ops.build", ok=bool)


if __name__ == "__main__":
    sys.exit(main())
