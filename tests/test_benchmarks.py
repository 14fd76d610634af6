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


def test_the_benchmark_builds_the_registry_towers():
    """The matched pair is the ablation configs' image towers; the sweep resizes the registry's B/32 towers."""
    from test_registry import CONFIG_TOWERS

    from rwkv_clip.backbones import TextRWKV, TextTransformer, TimmViT, VisionRWKV

    assert bench_backbones.IMAGE_TOWERS == {"rwkv": CONFIG_TOWERS["configs/ablations/rwkv_rwkv.yaml"][0],
                                            "vit": CONFIG_TOWERS["configs/ablations/vit_transformer.yaml"][0]}
    assert bench_backbones.TEXT_TOWERS == {"rwkv": CONFIG_TOWERS["configs/ablations/vit_rwkv.yaml"][1],
                                           "transformer": CONFIG_TOWERS["configs/ablations/vit_transformer.yaml"][1]}
    image = dict(kind="image", width=64, depth=1, head_size=32, res=64, patch=32, batch=2)
    rwkv, x = bench_backbones._build_tower(image, "rwkv")
    assert type(rwkv) is VisionRWKV and rwkv.training and x.shape == (2, 3, 64, 64)
    assert (rwkv.width, len(rwkv.blocks), rwkv.grid, rwkv.blocks[0].ffn.key.out_features) == (64, 1, (2, 2), 320)
    vit, _ = bench_backbones._build_tower(image, "vit")
    assert type(vit) is TimmViT and (vit.width, len(vit.model.blocks), vit.model.blocks[0].attn.num_heads) == (64, 1, 2)
    text = dict(kind="text", width=64, depth=1, head_size=32, context=16, batch=2)
    rwkv, tokens = bench_backbones._build_tower(text, "rwkv")
    assert type(rwkv) is TextRWKV and rwkv.blocks[0].ffn.key.out_features == 224 and tokens.shape == (2, 16)
    trf, _ = bench_backbones._build_tower(text, "transformer")
    assert type(trf) is TextTransformer and (trf.width, trf.layers, trf.heads) == (64, 1, 2)


def test_time_worker_explains_the_registry_towers():
    """kind=registry builds two named image towers; explain() splits the step time."""
    towers = {"rwkv": "vision_rwkv_demo", "vit": "vit_demo"}
    spec = dict(mode="time", kind="registry", towers=towers, res=64, batch=2, families=["rwkv", "vit"],
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
    bench_backbones.batch_in_budget("configs/demo.yaml", 64, 0.25, overrides=())
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
    # The verdicts depend on the machine; the exit status, the targets' lines and the overall line must agree.
    verdicts = [line.split()[0] for line in out.splitlines() if line.startswith(("  PASS  ", "  FAIL  "))]
    assert any("224/32 (T=49): RWKV / ViT time" in line for line in out.splitlines() if line.startswith(("  PASS", "  FAIL")))
    assert any("saved activation bytes" in line for line in out.splitlines() if line.startswith(("  PASS", "  FAIL")))
    verdict = "FAIL" if "FAIL" in verdicts else "PASS"
    assert f"overall: {verdict} ({len(verdicts)} target(s) judged)" in out
    assert rc == (0 if verdict == "PASS" else 1)


def test_micro_batch_benchmark_runs_both_paths(capsys):
    assert bench_micro_batch.main(["--batch", "6", "--micro", "6,4", "--width", "64", "--depth", "1",
                                   "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("whole", "4 "))]
    assert [r[0] for r in rows] == ["whole", "4"], out
    assert float(rows[0][3]) == 1.0 and float(rows[1][3]) > 0  # ratios to the unchunked step


def test_params_counts_each_config_as_built_from_its_class_paths(capsys):
    """--params builds the config's model with Lightning's instantiate_class; its total is the registry towers'."""
    from rwkv_clip.backbones import create_tower
    from rwkv_clip.module import CLIPModule

    stack = ["configs/demo.yaml", "configs/ablations/demo_vit_transformer.yaml"]  # the base and its overlay
    assert bench_backbones.main(["--params", *stack]) == 0
    row = next(line.split()[-4:] for line in capsys.readouterr().out.splitlines()
               if line.startswith("demo.yaml + demo_vit_transformer.yaml"))
    model = CLIPModule(create_tower("vit_demo"), create_tower("text_transformer_demo"), embed_dim=64)
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    printed = [float(row[i]) for i in (0, 1, 3)]  # image, text, total, in millions to 2 decimals
    assert printed == pytest.approx([count(model.image_encoder), count(model.text_encoder), count(model)], abs=0.0051)
