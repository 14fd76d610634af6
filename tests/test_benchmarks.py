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
    configs = {"rwkv": "configs/ablations/demo_rwkv_rwkv.yaml", "vit": "configs/ablations/demo_vit_transformer.yaml"}
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


def test_mem_worker_reports_exact_saved_bytes_fused_and_reference():
    spec = dict(mode="mem", kind="image", res=128, patch=16, batch=2, width=64, depth=2, head_size=64, threads=1)
    rwkv = bench_backbones.worker({**spec, "family": "rwkv"})
    vit = bench_backbones.worker({**spec, "family": "vit"})
    assert 0 < rwkv["saved_mib_per_sample"] < 0.6 * rwkv["saved_ref_mib_per_sample"]
    assert vit["saved_mib_per_sample"] > 0 and "saved_ref_mib_per_sample" not in vit


def test_budget_prints_a_larger_batch_for_the_fused_maths(capsys):
    bench_backbones.batch_in_budget("configs/ablations/demo_rwkv_rwkv.yaml", 64, 0.25)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith(("fp32", "bf16"))]
    batch = {(r[0], r[-4]): int(r[-1]) for r in rows}
    assert len(batch) == 4
    for precision in ("fp32", "bf16"):
        assert batch[(precision, "fused")] > batch[(precision, "reference")] > 0


def test_main_prints_the_comparison_and_the_breakdown(capsys):
    rc = bench_backbones.main(["--only", "image", "--sizes", "224/32", "--width", "64", "--depth", "1",
                               "--repeats", "1", "--threads", "1", "--no-matched", "--budget", ""])
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
