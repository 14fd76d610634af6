"""The benchmarks' own logic, at toy sizes: the numbers they print must come from the real code paths."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_backbones  # noqa: E402
import bench_micro_batch  # noqa: E402


def test_category_sorts_profiler_events():
    assert bench_backbones._category("aten::mm") == "gemm"
    assert bench_backbones._category("aten::addmm") == "gemm"
    assert bench_backbones._category("aten::convolution_backward") == "conv"
    assert bench_backbones._category("rwkv_clip::bi_wkv_cpu_backward") == "mixer"
    assert bench_backbones._category("rwkv_clip::bi_wkv_cuda") == "mixer"
    assert bench_backbones._category("aten::_scaled_dot_product_flash_attention_for_cpu") == "mixer"
    assert bench_backbones._category("aten::mul") == "other"


def test_time_worker_explains_the_ablation_config_towers():
    """kind=config builds the image towers of two ablation configs; explain() splits the step time."""
    configs = {"rwkv": "configs/demo.yaml", "vit": ["configs/demo.yaml", "configs/ablations/demo_vit_transformer.yaml"]}
    spec = dict(mode="time", kind="config", configs=configs, res=64, batch=2, families=["rwkv", "vit"],
                threads=1, repeats=1, explain=True)
    out = bench_backbones.worker(spec)
    for family in ("rwkv", "vit"):
        assert out[family] > 0
        ex = out["explain"][family]
        assert ex["gflop"] > 0
        parts = [ex[k] for k in ("gemm", "conv", "mixer", "other")]
        assert all(p >= 0 for p in parts) and ex["gemm"] > 0 and ex["mixer"] > 0
        assert sum(parts) == pytest.approx(out[family], rel=1e-6)  # the split is scaled to the median step time


def test_main_prints_the_comparison_and_the_breakdown(capsys):
    rc = bench_backbones.main(["--only", "image", "--sizes", "224/32", "--width", "64", "--depth", "1",
                               "--repeats", "1", "--threads", "1", "--no-matched"])
    out = capsys.readouterr().out
    assert "224/32 (T=49): RWKV / ViT time" in out
    assert "GEMM+conv GFLOP (fwd+bwd)" in out and "alone take" in out
    assert "parameter-matched" not in out
    assert rc in (0, 1)  # the verdict depends on the machine; the script must run to its end either way
    assert "overall:" in out


def test_micro_batch_benchmark_runs_both_paths(capsys):
    assert bench_micro_batch.main(["--batch", "6", "--micro", "6,4", "--width", "64", "--depth", "1",
                                   "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("whole", "4 "))]
    assert [r[0] for r in rows] == ["whole", "4"], out
    assert float(rows[0][3]) == 1.0 and float(rows[1][3]) > 0  # ratios to the unchunked step
