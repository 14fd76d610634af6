"""The benchmark callbacks in a Trainer, with a toy CLIP whose answers are known; DDP; main.py with the eval config.

The toy "sees" an image as its mean colour and a text as the colour words in it, so solid red/green/blue images
are classified perfectly and a yellow image filed under "blue" is a known miss. Run as a script (``python
tests/test_callbacks.py ddp OUT DATA``) this file is the 2-process CPU DDP worker of ``test_ddp_*``.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms as T

from rwkv_clip.callbacks import (
    EvalDataset,
    LinearProbe,
    ZeroShotClassification,
    ZeroShotRetrieval,
    load_classification,
)

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 30), "blue": (25, 30, 220), "yellow": (220, 210, 20)}
WORDS = {"red": 1, "green": 2, "blue": 3, "yellow": 4}


class ToyTokenizer:
    context_length, pad_id = 8, 0

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [WORDS.get(w.strip(".,"), 5) for w in t.lower().split()][: self.context_length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


TOY_TRANSFORM = T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor()])


class ToyCLIP(L.LightningModule):
    """encode_image: mean colour (centred); encode_text: sum of colour-word vectors. Both L2-normalised."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 3, bias=False)
        torch.nn.init.eye_(self.proj.weight)
        words = torch.zeros(6, 3)
        words[1:5] = torch.tensor([c for c in COLOURS.values()], dtype=torch.float) / 255
        words[1:5] -= words[1:5].mean(1, keepdim=True)
        self.register_buffer("words", words)
        self.modes = []  # (training?, grad enabled?) seen by encode_image
        self.forwards = 0

    def encode_image(self, images):
        self.modes.append((self.training, torch.is_grad_enabled()))
        self.forwards += 1
        m = images.mean(dim=(2, 3))
        return F.normalize(self.proj(m - m.mean(1, keepdim=True)), dim=-1)

    def encode_text(self, tokens):
        self.forwards += 1
        return F.normalize(self.words[tokens].sum(1) + 1e-4, dim=-1)

    def training_step(self, batch, batch_idx):
        return (self.proj.weight * 0).sum() + batch[0].sum() * 0

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", batch[0].float().mean())

    def test_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class ToyCLIPWithIO(ToyCLIP):
    """A model that knows its own preprocessing and tokenizer (the last fallback of the callbacks)."""

    def get_preprocess(self):
        return TOY_TRANSFORM

    def get_tokenizer(self):
        return ToyTokenizer()


class ToyDM(L.LightningDataModule):
    def __init__(self, with_val: bool = True):
        super().__init__()
        self.with_val = with_val
        self.tokenizer = ToyTokenizer()
        self.eval_transform = TOY_TRANSFORM

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=2) if self.with_val else []

    def test_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=2)


def _img(colour, size=12, noise_seed=None):
    a = np.zeros((size, size, 3), np.uint8) + np.array(COLOURS[colour], np.uint8)
    if noise_seed is not None:
        a = np.clip(a + np.random.default_rng(noise_seed).integers(-15, 15, a.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    """An ImageFolder (3 colour classes, a yellow image filed under blue), class names in another order than the
    folders, templates, and a Karpathy JSON over the same images."""
    root = tmp_path_factory.mktemp("eval")
    files = []
    for c in ("red", "green", "blue"):
        (root / "folder" / "test" / c).mkdir(parents=True)
        for i in range(4):
            colour = "yellow" if (c, i) == ("blue", 3) else c  # the known miss
            _img(colour, noise_seed=i).save(root / "folder" / "test" / c / f"{i}.png")
            files.append((f"{c}/{i}.png", colour))
    (root / "classnames.json").write_text(json.dumps({"colours": ["red", "green", "blue"]}))  # not sorted
    (root / "templates.json").write_text(json.dumps({"colours": ["a photo of a {c}.", "a {c} thing."]}))
    images = [{"filename": f, "filepath": "", "split": "test" if i % 2 == 0 else "train",
               "sentences": [{"raw": f"a {colour} square"}, {"raw": f"something {colour}"}]}
              for i, (f, colour) in enumerate(files)]
    (root / "karpathy.json").write_text(json.dumps({"images": images}))
    return root


def _cls_cfg(**kw):
    return {**dict(name="colours", source="imagefolder", root="folder", classnames="classnames.json",
                   templates="templates.json", batch_size=5), **kw}


def _ret_cfg(**kw):
    return {**dict(name="karpathy", source="karpathy", root="folder/test", annotations="karpathy.json",
                   batch_size=4), **kw}


def _trainer(tmp_path, callbacks, **kw):
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=kw.pop("max_epochs", 1), logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kw,
    )


def _tags(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc.Tags()


# ---------------------------------------------------------------- when they run, what they log


def test_fit_runs_at_the_end_of_each_training_epoch(eval_data, tmp_path):
    zs = ZeroShotClassification(datasets=[_cls_cfg()], root=str(eval_data), class_batch_size=2)
    ret = ZeroShotRetrieval(datasets=[_ret_cfg()], root=str(eval_data))
    # val_check_interval=0.5 validates mid-epoch too: the benchmarks still run once per epoch, after validation
    model, trainer = ToyCLIP(), _trainer(tmp_path, [zs, ret], max_epochs=2, val_check_interval=0.5)
    calls, orig = [], zs.run
    zs.run = lambda tr, pl, in_loop=True: calls.append((tr.current_epoch, tr.global_step)) or orig(tr, pl, in_loop)
    trainer.fit(model, datamodule=ToyDM(with_val=True))
    assert calls == [(0, 2), (1, 4)]
    m = trainer.callback_metrics
    # 11 of 12 images right (the yellow one filed under blue); per class: 1, 1, 3/4
    assert m["zeroshot/colours/top1"].item() == pytest.approx(11 / 12)
    assert m["zeroshot/colours/mean_per_class_recall"].item() == pytest.approx((1 + 1 + 0.75) / 3)
    assert "zeroshot/colours/top5" not in m  # 3 classes
    assert m["retrieval/karpathy/image_retrieval_recall@10"].item() == 1.0  # 6 images < 10
    assert "retrieval/karpathy/text_retrieval_recall@1" in m and "zeroshot/colours/top1" in trainer.progress_bar_metrics
    # eval mode without grad while they ran, training mode back afterwards
    assert model.modes and all(mode == (False, False) for mode in model.modes) and model.training
    tags = _tags(trainer.log_dir)
    assert "zeroshot/colours/top1" in tags["scalars"]
    assert "zeroshot/colours/confusion_matrix" in tags["images"] and "retrieval/karpathy/top3_captions" in tags["images"]


def test_checkpoint_can_monitor_a_benchmark_metric(eval_data, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    zs = ZeroShotClassification(datasets=[_cls_cfg()], root=str(eval_data), log_images=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="zeroshot/colours/top1", mode="max")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, callbacks=[zs, ckpt], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(ToyCLIP(), datamodule=ToyDM(with_val=True))
    assert ckpt.best_model_score.item() == pytest.approx(11 / 12)


def test_every_n_epochs_without_val(eval_data, tmp_path):
    zs = ZeroShotClassification(datasets=[_cls_cfg()], root=str(eval_data), every_n_epochs=2, log_images=False)
    trainer = _trainer(tmp_path, [zs], max_epochs=3)
    calls, orig = [], zs.run
    zs.run = lambda tr, pl, in_loop=True: calls.append(tr.current_epoch) or orig(tr, pl, in_loop)
    trainer.fit(ToyCLIP(), datamodule=ToyDM(with_val=False))
    assert calls == [1]  # 0-based: only the second of three epochs
    assert trainer.callback_metrics["zeroshot/colours/top1"].item() == pytest.approx(11 / 12)


def test_validate_and_test_write_clip_benchmark_json_and_print_one_table(eval_data, tmp_path, capsys):
    out = str(tmp_path / "res")
    zs = ZeroShotClassification(datasets=[_cls_cfg()], root=str(eval_data), output_dir=out)
    ret = ZeroShotRetrieval(datasets=[_ret_cfg()], root=str(eval_data), output_dir=out)
    lp = LinearProbe(datasets=[_cls_cfg()], root=str(eval_data), output_dir=out)
    result = _trainer(tmp_path, [zs, ret, lp]).validate(ToyCLIP(), datamodule=ToyDM(with_val=True))
    assert result[0]["zeroshot/colours/top1"] == pytest.approx(11 / 12)
    rec = json.loads((tmp_path / "res" / "zeroshot_classification_colours.json").read_text())
    assert rec["dataset"] == "colours" and rec["task"] == "zeroshot_classification" and rec["model"] == "ToyCLIP"
    assert rec["metrics"]["acc1"] == pytest.approx(11 / 12) and "mean_per_class_recall" in rec["metrics"]
    assert rec["extra"] == {"num_samples": 12, "skipped": 0}
    r = json.loads((tmp_path / "res" / "zeroshot_retrieval_karpathy.json").read_text())
    assert set(r["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    p = json.loads((tmp_path / "res" / "linear_probe_colours.json").read_text())
    assert p["task"] == "linear_probe" and p["metrics"]["lp_acc1"] >= 0.5 and "weight_decay" in p["metrics"]
    printed = capsys.readouterr().out
    assert printed.count("zeroshot_classification (%") == 1 and printed.count("zeroshot_retrieval (%") == 1
    assert "91.67" in printed and "linear_probe (%" in printed
    # test: the same numbers from on_test_epoch_end
    zs2 = ZeroShotClassification(datasets=[_cls_cfg()], root=str(eval_data), output_dir=str(tmp_path / "res2"))
    assert _trainer(tmp_path, [zs2]).test(ToyCLIP(), datamodule=ToyDM())[0]["zeroshot/colours/top1"] == \
        pytest.approx(11 / 12)


def test_no_loss_batches_and_no_datamodule_fall_back_to_the_model(eval_data, tmp_path):
    """As configs/eval/clip_benchmark.yaml runs: limit_val_batches=0, no datamodule; the model brings its
    preprocessing and tokenizer."""
    zs = ZeroShotClassification(datasets=[_cls_cfg()], root=str(eval_data), output_dir=str(tmp_path / "res"))
    trainer = _trainer(tmp_path, [zs], limit_val_batches=0)
    trainer.validate(ToyCLIPWithIO())
    rec = json.loads((tmp_path / "res" / "zeroshot_classification_colours.json").read_text())
    assert rec["metrics"]["acc1"] == pytest.approx(11 / 12)
    assert "zeroshot/colours/top1" in _tags(trainer.log_dir)["scalars"]
    with pytest.raises(ValueError, match="image_size.*eval_transform.*get_preprocess"):
        _trainer(tmp_path, [ZeroShotClassification(datasets=[_cls_cfg()], root=str(eval_data))],
                 limit_val_batches=0).validate(ToyCLIP())
    with pytest.raises(ValueError, match="tokenizer.*datamodule.*get_tokenizer"):
        _trainer(tmp_path, [ZeroShotClassification(datasets=[_cls_cfg()], root=str(eval_data), image_size=8)],
                 limit_val_batches=0).validate(ToyCLIP())


def test_corrupt_image_is_skipped_and_counted(tmp_path, capsys):
    for c in ("blue", "red"):
        (tmp_path / "f" / c).mkdir(parents=True)
        _img(c).save(tmp_path / "f" / c / "ok.png")
    (tmp_path / "f" / "red" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "t.json").write_text(json.dumps({"f": ["a {c} photo"]}))
    zs = ZeroShotClassification(datasets=[dict(name="f", source="imagefolder", root=str(tmp_path / "f"),
                                               templates=str(tmp_path / "t.json"))],
                                output_dir=str(tmp_path / "res"), log_images=False)
    _trainer(tmp_path, [zs]).validate(ToyCLIP(), datamodule=ToyDM())
    assert zs.results["f"]["skipped"] == 1 and zs.results["f"]["num_samples"] == 2 and zs.results["f"]["top1"] == 1.0
    assert "skipped 1 sample" in capsys.readouterr().out


def test_fast_dev_run_is_a_one_batch_smoke_test(eval_data, tmp_path):
    zs = ZeroShotClassification(datasets=[_cls_cfg()], root=str(eval_data), log_images=False)  # batch 5 of 12
    ret = ZeroShotRetrieval(datasets=[_ret_cfg()], root=str(eval_data), log_images=False)  # batch 4 of 6
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=True, callbacks=[zs, ret], enable_progress_bar=False)
    trainer.fit(ToyCLIP(), datamodule=ToyDM())
    assert zs.results["colours"]["num_samples"] == 5 and ret.results["karpathy"]["num_samples"] == 4
    _trainer(tmp_path, [zs]).validate(ToyCLIP(), datamodule=ToyDM())
    assert zs.results["colours"]["num_samples"] == 12  # the next run has the whole set again


def test_bf16_precision_is_followed(eval_data, tmp_path):
    zs = ZeroShotClassification(datasets=[_cls_cfg()], root=str(eval_data), log_images=False)
    seen = []

    class Probe(ToyCLIP):
        def encode_image(self, images):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return super().encode_image(images)

    _trainer(tmp_path, [zs], precision="bf16-mixed").validate(Probe(), datamodule=ToyDM())
    assert seen and all(s == torch.bfloat16 for s in seen)
    assert zs.results["colours"]["top1"] == pytest.approx(11 / 12)


def test_yaml_config_through_lightning_cli(eval_data, tmp_path):
    from lightning.pytorch.cli import LightningCLI

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
trainer:
  logger: false
  callbacks:
    - class_path: rwkv_clip.callbacks.ZeroShotClassification
      init_args:
        root: {eval_data}
        every_n_epochs: 2
        datasets:
          - {{name: colours, source: imagefolder, root: folder, classnames: classnames.json, batch_size: 3}}
""")
    cli = LightningCLI(ToyCLIP, ToyDM, run=False, args=["--config", str(cfg)])
    zs = [c for c in cli.trainer.callbacks if isinstance(c, ZeroShotClassification)][0]
    assert zs.every_n_epochs == 2 and isinstance(zs.datasets[0], EvalDataset) and zs.datasets[0].batch_size == 3
    assert zs.datasets[0].root == str(eval_data / "folder")


def test_demo_test_split_is_an_ordinary_litdata_set(tmp_path):
    """configs/demo.yaml's callback entries, on a tiny demo set: LitData with a label, names and templates beside."""
    import yaml

    from rwkv_clip.datamodules.demo import ensure_demo_data

    root = str(tmp_path / "demo")
    ensure_demo_data(root, num_train=8, num_val=4, num_test_per_class=3, image_size=16, shapes=["circle", "square"],
                     colours=["red", "blue"], vocab_size=300)
    entries = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["trainer"]["callbacks"]
    callbacks = []
    for e in entries:
        cls = {"ZeroShotClassification": ZeroShotClassification, "ZeroShotRetrieval": ZeroShotRetrieval}[
            e["class_path"].rsplit(".", 1)[1]]
        assert e["init_args"]["root"] == "data/demo"
        callbacks.append(cls(**{**e["init_args"], "root": root, "output_dir": str(tmp_path / "res")}))
    lp = LinearProbe(datasets=[dict(name="demo", source="litdata", root="test")], root=root)
    _trainer(tmp_path, [*callbacks, lp]).validate(ToyCLIP(), datamodule=ToyDM())
    zs, ret = callbacks
    assert load_classification(zs.datasets[0]).classnames == ["red circle", "red square", "blue circle", "blue square"]
    assert zs.results["demo"]["num_samples"] == 12 and 0.0 <= zs.results["demo"]["top1"] <= 1.0
    assert ret.results["demo"]["num_texts"] > 12  # several distinct captions per image
    assert lp.results["demo"]["num_samples"] == 6  # half of the 12 test images; the other half fits the probe


# ---------------------------------------------------------------- DDP


def test_ddp_with_ragged_shares_matches_one_process(eval_data, tmp_path):
    """2 CPU ranks (gloo): 13 images, 3 classes and 13 captions split unevenly; the gathered metrics equal the
    single-process ones, and both ranks ran the same number of forwards (so collectives inside a sharded model
    could not hang)."""
    odd = tmp_path / "odd"
    for c in ("red", "green", "blue"):
        for i in range(5 if c == "red" else 4):
            (odd / c).mkdir(parents=True, exist_ok=True)
            _img(c if (c, i) != ("blue", 3) else "yellow", noise_seed=i).save(odd / c / f"{i}.png")
    (odd / "names.json").write_text(json.dumps({"odd": ["red", "green", "blue"]}))
    (odd / "templates.json").write_text(json.dumps({"odd": ["a {c} photo", "{c}"]}))
    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__, "ddp", str(out), str(eval_data), str(odd)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    single = _worker(eval_data, odd, tmp_path / "single", devices=1)
    assert got["results"] == single["results"]
    assert single["results"]["odd"]["num_samples"] == 13
    assert got["forwards"][0] == got["forwards"][1] > 0


def _worker(eval_data, odd, out_dir, devices):
    zs = ZeroShotClassification(datasets=[_cls_cfg(), dict(name="odd", source="imagefolder", root=str(odd),
                                                           classnames=str(odd / "names.json"), batch_size=2,
                                                           templates=str(odd / "templates.json"))],
                                root=str(eval_data), log_images=False, class_batch_size=1)
    ret = ZeroShotRetrieval(datasets=[_ret_cfg(batch_size=3)], root=str(eval_data), log_images=False)
    model = ToyCLIP()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        callbacks=[zs, ret], default_root_dir=out_dir, limit_val_batches=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, datamodule=ToyDM())
    forwards = trainer.strategy.all_gather(torch.tensor(model.forwards)).tolist() if devices > 1 else [model.forwards]
    results = {k: {m: round(v, 6) for m, v in r.items()} for c in (zs, ret) for k, r in c.results.items()}
    return {"results": results, "forwards": forwards, "rank": trainer.global_rank}


# ---------------------------------------------------------------- main.py with configs/eval/clip_benchmark.yaml

EVAL_EXTRAS = [m for m in ("clip_benchmark", "scipy", "pycocotools") if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(bool(EVAL_EXTRAS), reason=f"needs the eval extra (missing: {', '.join(EVAL_EXTRAS)}): "
                                              "pip install 'rwkv-clip[eval]'")
def test_clip_benchmark_config_runs_the_suite_from_a_checkpoint(tmp_path):
    """`main.py validate --config configs/eval/clip_benchmark.yaml --ckpt_path X`, the path a user takes, on a
    tiny copy of all 13 sets in their layouts under data/eval/: one table, 13 CLIP_benchmark JSONs."""
    import eval_layouts

    from rwkv_clip.callbacks.datasets import clip_benchmark_file

    sets = eval_layouts.make_all(tmp_path / "data" / "eval")
    eval_layouts.make_caltech101(tmp_path / "data" / "eval" / "caltech101",
                                 [f"{k:03d}_folder" for k in range(len(clip_benchmark_file("classnames")["caltech101"]))])
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    ckpt = tmp_path / "tiny.ckpt"
    subprocess.run([sys.executable, "-c", f"""
from lightning.pytorch.cli import LightningCLI
from rwkv_clip.module import CLIPModule
cli = LightningCLI(CLIPModule, subclass_mode_model=True, run=False,
                   args=["--model=tiny_clip.TinyCLIPModule", "--trainer.logger=false"])
cli.trainer.strategy.connect(cli.model)
cli.trainer.save_checkpoint({str(ckpt)!r})
"""], check=True, cwd=tmp_path, env=env, timeout=300)
    # The config as written, but decoding in the main process: 8 loader workers per tiny set only add start-up.
    config = tmp_path / "clip_benchmark.yaml"
    config.write_text((REPO / "configs" / "eval" / "clip_benchmark.yaml").read_text()
                      .replace("num_workers: 8", "num_workers: 0"))
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, eval_layouts; eval_layouts.patch_torchvision_checksums(); "
         "from rwkv_clip.cli import main; main()", "validate", "--config", str(config),
         "--ckpt_path", str(ckpt),
         "--trainer.precision=32-true", "--trainer.accelerator=cpu"],
        cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = sorted((tmp_path / "logs" / "clip_benchmark").rglob("*.json"))
    assert len(results) == 13, results
    coco = json.loads(next(p for p in results if p.name == "zeroshot_retrieval_mscoco_captions.json").read_text())
    assert coco["pretrained"] == str(ckpt) and coco["extra"]["num_samples"] == sets["mscoco_captions"]["n"]
    out = proc.stdout
    assert out.count("zeroshot_classification (%") == 1 and "mean (11)" in out and "Pets*" in out
    assert "MSCOCO 5k" in out and "Flickr30k 1k" in out and "I→T R@10" in out


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "ddp":
    res = _worker(Path(sys.argv[3]), Path(sys.argv[4]), None, devices=2)
    if res["rank"] == 0:
        Path(sys.argv[2]).write_text(json.dumps({"results": res["results"], "forwards": res["forwards"]}))
    torch.distributed.destroy_process_group()  # as main.py does: gloo's threads torn down at exit can abort
