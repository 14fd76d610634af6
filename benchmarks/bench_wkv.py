"""Benchmark of the Bi-WKV operator: time, peak memory and GFLOP/s per backend, against torch.mm and SDPA.

    python benchmarks/bench_wkv.py                 # full table + PASS/FAIL per target (~5 min on 2 cores)
    python benchmarks/bench_wkv.py --repeats 3 --quick   # skip T=4096

FLOP count (stated, algorithmic): one scan costs 4·N² per token and head (2·N² to read the N×N state
with r, 2·N² to decay it and add k vᵀ); bi_wkv runs two scans, so forward = 8·B·T·H·N² and the
backward re-runs six scans, so forward+backward = 32·B·T·H·N². SDPA forward = 4·B·H·T²·N.
Times are medians over --repeats runs (the machine is shared, so expect noise). Peak memory is the
growth of the peak RSS (CPU) or of max_memory_allocated (CUDA) over one forward+backward, measured in a
fresh process (CPU) with the inputs already allocated.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rwkv_clip.ops import bi_wkv  # noqa: E402

IMAGE = [(8, T, 8, 80) for T in (49, 196, 1024, 4096)]
TEXT = [(8, 77, 10, 64)]
CUDA_EXTRA = [(64, 196, 8, 80), (64, 4096, 8, 80)]
REF_BWD_MAX_T = 196  # the reference stores a B·H·N² state per token: fwd+bwd at T=1024 needs ~10 GB
SDPA_BWD_MAX_T = 1024  # SDPA fwd+bwd at T=4096 on 2 cores takes minutes per repeat


def inputs(B, T, H, N, device="cpu", dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    r, k, v = (torch.randn(B, T, H, N, generator=g) * 0.5 for _ in range(3))
    w = torch.rand(B, T, H, N, generator=g) * 7 - 6
    u = torch.randn(H, N, generator=g) * 0.5
    return [x.to(device, dtype).requires_grad_(grad) for x in (r, k, v, w, u)]


def sdpa_inputs(B, T, H, N, device="cpu", dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, N, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3)]


def step(kind, backend, xs, train):
    if kind == "sdpa":
        y = F.scaled_dot_product_attention(*xs)
    else:
        y = bi_wkv(*xs, backend=backend)
    if train:
        y.backward(torch.ones_like(y))
        for x in xs:
            x.grad = None


STAT = statistics.median


def timeit(fn, repeats, cuda=False, warmup=True):
    if warmup:
        fn()  # warm-up (and lazy build)
    ts = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return STAT(ts)


def measure(kind, backend, shape, train, repeats, device="cpu", dtype=torch.float32, warmup=True):
    make = sdpa_inputs if kind == "sdpa" else inputs
    xs = make(*shape, device=device, dtype=dtype, grad=train)
    ctx = torch.enable_grad() if train else torch.no_grad()
    with ctx:
        return timeit(lambda: step(kind, backend, xs, train), repeats, cuda=device == "cuda", warmup=warmup)


def peak_cpu(kind, backend, shape):
    """Peak RSS growth (bytes) of one forward+backward, in a fresh process.

    Large blocks are mmap-ed (MALLOC_MMAP_THRESHOLD_) so freed memory leaves the RSS, and the RSS
    high-water mark is reset (/proc/self/clear_refs) once the inputs exist.
    """
    cmd = [sys.executable, __file__, "--_peak", json.dumps([kind, backend, list(shape)])]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if out.returncode != 0:
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


def _peak_child(spec):
    kind, backend, shape = json.loads(spec)
    if kind != "sdpa":
        bi_wkv(*inputs(1, 2, 1, 8), backend=backend)  # load the extension before the baseline
    make = sdpa_inputs if kind == "sdpa" else inputs
    xs = make(*shape, grad=True)

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = status("VmRSS:")
        step(kind, backend, xs, True)
        print(status("VmHWM:") - base)
    except OSError:  # no /proc: fall back to the process-lifetime peak
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(kind, backend, xs, True)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)


def peak_cuda(kind, backend, shape, dtype):
    make = sdpa_inputs if kind == "sdpa" else inputs
    xs = make(*shape, device="cuda", dtype=dtype, grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(kind, backend, xs, True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def wkv_flops(B, T, H, N):
    return 8 * B * T * H * N * N


def sdpa_flops(B, T, H, N):
    return 4 * B * H * T * T * N


def fmt(x, spec):
    return "—" if x is None or x != x else format(x, spec)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="skip T=4096")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="statistic over repeats; 'min' is the least-disturbed run on a busy machine")
    p.add_argument("--_peak", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._peak:
        return _peak_child(args._peak)
    global STAT
    STAT = min if args.stat == "min" else statistics.median

    shapes = [s for s in IMAGE + TEXT if not (args.quick and s[1] >= 4096)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, repeats {args.repeats} ({args.stat}), "
          f"load average {os.getloadavg()[0]:.1f}")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm = 2 * 2048 ** 3 / timeit(lambda: torch.mm(a, b), max(args.repeats, 5)) / 1e9
    print(f"torch.mm 2048² fp32: {mm:.1f} GFLOP/s\n")

    rows, res = [], {}
    print("| shape (B,T,H,N) | backend | fwd ms | fwd+bwd ms | peak MiB (fwd+bwd) | fwd GFLOP/s | fwd+bwd GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        B, T, H, N = shape
        big = T >= 1024
        for kind, backend in (("wkv", "cpu"), ("wkv", "reference"), ("sdpa", "sdpa")):
            slow = (backend == "reference" and big) or (kind == "sdpa" and T >= 4096)
            rep = 1 if slow else max(3, args.repeats // 2) if big or backend == "reference" else args.repeats
            # the reference at T >= 1024 runs once, without warm-up (it takes minutes on 2 cores)
            tf = measure(kind, backend, shape, False, rep, warmup=not (backend == "reference" and big))
            train = not ((backend == "reference" and T > REF_BWD_MAX_T) or (kind == "sdpa" and T > SDPA_BWD_MAX_T))
            tb = measure(kind, backend, shape, True, rep) if train else None
            mem = peak_cpu(kind, backend, shape) / 2 ** 20 if train else None
            fl = sdpa_flops(*shape) if kind == "sdpa" else wkv_flops(*shape)
            res[(shape, backend)] = dict(fwd=tf, fb=tb, mem=mem, gf=fl / tf / 1e9)
            print(f"| {shape} | {backend} | {tf * 1e3:.1f} | {fmt(tb and tb * 1e3, '.1f')} | {fmt(mem, '.0f')} | "
                  f"{fl / tf / 1e9:.1f} | {fmt(tb and (4 * fl if kind != 'sdpa' else 3 * fl) / tb / 1e9, '.1f')} |",
                  flush=True)

    print("\nRatios (cpu kernel):")
    for shape in shapes:
        c, r, s = (res[(shape, be)] for be in ("cpu", "reference", "sdpa"))
        parts = [f"fwd {r['fwd'] / c['fwd']:.1f}x vs reference", f"fwd {s['fwd'] / c['fwd']:.2f}x vs SDPA",
                 f"fwd {100 * c['gf'] / mm:.0f}% of mm"]
        if r["fb"]:
            parts.append(f"fwd+bwd {r['fb'] / c['fb']:.1f}x vs reference, memory {c['mem'] / r['mem']:.3f}x")
        if s["fb"]:
            parts.append(f"fwd+bwd {s['fb'] / c['fb']:.2f}x vs SDPA")
        print(f"  {shape}: " + "; ".join(parts))

    print("\nTargets:")
    img = lambda T: res[((8, T, 8, 80), "cpu")]  # noqa: E731
    ref196 = res[((8, 196, 8, 80), "reference")]
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    sp = ref196["fb"] / img(196)["fb"]
    print(f"  {verdict(sp >= 10)}  cpu fwd+bwd >= 10x faster than reference at T=196: {sp:.1f}x")
    mr = img(196)["mem"] / ref196["mem"]
    print(f"  {verdict(mr <= 0.1)}  cpu peak memory <= 1/10 of reference at T=196: {mr:.3f}x")
    frac = img(196)["gf"] / mm
    print(f"  {verdict(frac >= 0.2)}  cpu forward >= 20% of torch.mm GFLOP/s at T=196: {100 * frac:.0f}% "
          f"({img(196)['gf']:.1f} of {mm:.1f})")
    if not args.quick:
        lin = img(4096)["fb"] / img(1024)["fb"]
        linf = img(4096)["fwd"] / img(1024)["fwd"]
        print(f"  {verdict(lin <= 4.5)}  cpu time T=4096 / T=1024 <= 4.5: fwd+bwd {lin:.2f}, fwd {linf:.2f}")
    for T in (1024, 4096):
        if args.quick and T == 4096:
            continue
        s = res[((8, T, 8, 80), "sdpa")]
        ok = img(T)["fwd"] < s["fwd"] and (s["fb"] is None or img(T)["fb"] < s["fb"])
        extra = f", fwd+bwd {s['fb'] / img(T)['fb']:.2f}x" if s["fb"] else ""
        print(f"  {verdict(ok)}  cpu faster than SDPA at T={T}: fwd {s['fwd'] / img(T)['fwd']:.2f}x{extra}")

    if not torch.cuda.is_available():
        print("\nCUDA: no GPU visible, CUDA columns skipped.")
        return
    print(f"\nCUDA ({torch.cuda.get_device_name()}), bf16:")
    print("| shape (B,T,H,N) | backend | fwd ms | fwd+bwd ms | peak MiB (fwd+bwd) | fwd GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for shape in shapes + CUDA_EXTRA:
        for kind, backend in (("wkv", "cuda"), ("sdpa", "sdpa")):
            tf = measure(kind, backend, shape, False, args.repeats, "cuda", torch.bfloat16)
            tb = measure(kind, backend, shape, True, args.repeats, "cuda", torch.bfloat16)
            mem = peak_cuda(kind, backend, shape, torch.bfloat16) / 2 ** 20
            fl = sdpa_flops(*shape) if kind == "sdpa" else wkv_flops(*shape)
            print(f"| {shape} | {backend} | {tf * 1e3:.2f} | {tb * 1e3:.2f} | {mem:.0f} | {fl / tf / 1e9:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
