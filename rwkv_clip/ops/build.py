"""Prebuild the bi_wkv extensions into the cache, so the first training step does not wait for a compile.

    python -m rwkv_clip.ops.build            # C++ CPU kernel (+ CUDA kernel if a GPU is visible)
    python -m rwkv_clip.ops.build --cuda     # also compile the CUDA kernel without a GPU (sm_80, sm_90 + visible GPUs)
    python -m rwkv_clip.ops.build --no-cpu --cuda --verbose
    python -m rwkv_clip.ops.build --no-cuda   # CPU only

Set CUDA_HOME if nvcc is not on PATH (e.g. CUDA_HOME=/usr/local/cuda). Exit status 1 if a requested build fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .bi_wkv._build import cache_root, cuda_archs, get_extension


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rwkv_clip.ops.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--cuda", action="store_true", help="build the CUDA extension even if no GPU is visible")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA extension even if a GPU is visible")
    p.add_argument("--no-cpu", action="store_true", help="skip the C++ CPU extension")
    p.add_argument("--verbose", action="store_true", help="show compiler commands and output")
    args = p.parse_args(argv)

    kinds = ([] if args.no_cpu else ["cpu"]) + (
        ["cuda"] if args.cuda or (torch.cuda.is_available() and not args.no_cuda) else [])
    if not kinds:
        p.error("nothing to build (--no-cpu without --cuda and no GPU visible)")
    print(f"cache: {cache_root()}")
    failed = False
    for kind in kinds:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or ";".join(cuda_archs())
        extra = f" for compute capabilities {archs}" if kind == "cuda" else ""
        print(f"building bi_wkv {kind} extension{extra} ...", flush=True)
        t0 = time.time()
        try:
            mod = get_extension(kind, verbose=args.verbose)
        except RuntimeError as e:
            print(f"FAILED: {e}", file=sys.stderr)
            failed = True
            continue
        print(f"  ok in {time.time() - t0:.1f}s: {mod.__file__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
