"""Benchmark callbacks end to end with a toy CLIP whose answers are known: eval sources, hooks, logging, DDP.

The toy "sees" an image as its mean colour and a text as the colour words in it, so solid red/green/blue images
are classified perfectly and a wrongly labelled image is a known miss. Run as a script (``python
tests/test_callbacks.py ddp OUT``) it is the 2-process CPU DDP worker of ``test_ddp_matches_single_process``.
"""

import csv
import io
import json
import os
import pickle
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

from rwkv_clip.callbacks import EvalDataset, LinearProbe, ZeroShotClassification, ZeroShotRetrieval
from rwkv_clip.callbacks.datasets import build_classification, build_retrieval

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

    def encode_image(self, images):
        self.modes.append((self.training, torch.is_grad_enabled()))
        m = images.mean(dim=(2, 3))
        return F.normalize(self.proj(m - m.mean(1, keepdim=True)), dim=-1)

    def encode_text(self, tokens):
        return F.normalize(self.words[tokens].sum(1) + 1e-4, dim=-1)

    def training_step(self, batch, batch_idx):
        return (self.proj.weight * 0).sum() + batch[0].sum() * 0

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", batch[0].float().mean())

    def test_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class ToyDM(L.LightningDataModule):
    def __init__(self, with_val: bool = True):
        super().__init__()
        self.with_val = with_val
        self.tokenizer = ToyTokenizer()
        self.eval_transform = T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor()])

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
    """An ImageFolder (3 colour classes, one image in the wrong folder), a classnames/templates JSON, a Karpathy
    JSON and a CSV over the same images."""
    root = tmp_path_factory.mktemp("eval")
    folder = root / "folder" / "test"
    files = []
    for c in ("red", "green", "blue"):
        (folder / c).mkdir(parents=True)
        for i in range(4):
            colour = "yellow" if (c, i) == ("blue", 3) else c  # a yellow image in "blue": the known miss
            _img(colour, noise_seed=i).save(folder / c / f"{i}.png")
            files.append((f"{c}/{i}.png", colour))
    # classnames follow the label order, which for an ImageFolder is the sorted folder names
    (root / "classnames.json").write_text(json.dumps({"colours": ["blue", "green", "red"]}))
    (root / "templates.json").write_text(json.dumps({"colours": ["a photo of a {c}.", "a {c} thing."]}))
    images = [
        {"filename": f, "filepath": "", "split": "test" if i % 2 == 0 else "train",
         "sentences": [{"raw": f"a {colour} square"}, {"raw": f"something {colour}"}, {"raw": ""}]}
        for i, (f, colour) in enumerate(files)
    ]
    (root / "karpathy.json").write_text(json.dumps({"images": images}))
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        for fn, colour in files[:6]:
            w.writerow([fn, f"a {colour} square"])
            w.writerow([fn, f"the colour {colour}"])
    return root


def _cls_cfg(root, **kw):
    return dict(name="colours", source="imagefolder", root=str(root / "folder"), split="test",
                classnames=str(root / "classnames.json"), templates=str(root / "templates.json"), batch_size=5, **kw)


def _ret_cfg(root, **kw):
    return dict(name="karpathy", source="karpathy", root=str(root / "folder" / "test"),
                annotations=str(root / "karpathy.json"), batch_size=4, **kw)


def _trainer(tmp_path, callbacks, **kw):
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=kw.pop("max_epochs", 1), logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kw,
    )


# ---------------------------------------------------------------- sources


def test_sources_imagefolder_karpathy_csv(eval_data):
    cs = build_classification(EvalDataset(**_cls_cfg(eval_data)))
    assert cs.classnames == ["blue", "green", "red"] and len(cs.indices) == 12 and len(cs.templates) == 2
    rs = build_retrieval(EvalDataset(**_ret_cfg(eval_data)))
    assert len(rs.indices) == 6 and all(len(c) == 2 for c in rs.captions)  # the empty caption is dropped
    csv_set = build_retrieval(EvalDataset(name="c", source="csv", root=str(eval_data / "folder" / "test"),
                                          annotations=str(eval_data / "captions.csv")))
    assert len(csv_set.indices) == 6 and csv_set.captions[0] == ["a red square", "the colour red"]
    sub = build_classification(EvalDataset(**_cls_cfg(eval_data, max_samples=5)))
    assert len(sub.indices) == 5 and sub.indices == sorted(set(sub.indices))


def test_folder_names_as_classnames_and_default_templates(eval_data):
    cs = build_classification(EvalDataset(name="whatever", source="imagefolder", root=str(eval_data / "folder")))
    assert cs.classnames == ["blue", "green", "red"]  # ImageFolder's sorted folder names
    assert len(cs.templates) == 80  # unknown dataset name: the shipped ImageNet templates


def test_clear_errors(eval_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_classification(EvalDataset(name="x", source="imagefolder", root=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        build_classification(EvalDataset(**{**_cls_cfg(eval_data), "classnames": str(tmp_path / "missing.json")}))
    with pytest.raises(KeyError, match="colours"):  # wrong key: the error lists the keys present
        build_classification(EvalDataset(**{**_cls_cfg(eval_data), "name": "imagenet1k"}))
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        build_classification(EvalDataset(name="cifar10", source="cifar10", root=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="annotations"):
        build_retrieval(EvalDataset(name="k", source="karpathy", root=str(tmp_path)))
    with pytest.raises(ValueError, match="splits present"):
        build_retrieval(EvalDataset(**_ret_cfg(eval_data, split="val")))
    wnid = tmp_path / "wnid" / "n01440764"
    wnid.mkdir(parents=True)
    _img("red").save(wnid / "a.png")
    with pytest.raises(ValueError, match="WordNet"):
        build_classification(EvalDataset(name="imagenet", source="imagefolder", root=str(tmp_path / "wnid")))
    with pytest.raises(ValueError, match="empty"):
        ZeroShotClassification(datasets=[])


def test_cifar_on_disk_format(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in ["data_batch_%d" % i for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 9]}
        (d / name).write_bytes(pickle.dumps(batch))
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": ["x"] * 10}))
    import torchvision.datasets.cifar as tv_cifar

    # our fake pickles have other md5s than the real files
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    cs = build_classification(EvalDataset(name="cifar10", source="cifar10", root=str(tmp_path)))
    assert cs.classnames[0] == "airplane" and len(cs.templates) == 18 and len(cs.indices) == 4
    img, label = cs.source.load(3)
    assert img.size == (32, 32) and label == 9


def test_litdata_source(tmp_path):
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(tmp_path / "ld" / "test"), chunk_bytes="1MB")  # in-process: no optimize workers
    for i in range(6):
        writer.add_item(i, _litdata_sample(i))
    writer.done()
    writer._merge_no_wait()
    # the linear probe needs no classnames; labels come from the "label" field
    cs = build_classification(EvalDataset(name="ld", source="litdata", root=str(tmp_path / "ld")), need_prompts=False)
    assert len(cs.indices) == 6 and cs.source.load(4)[1] == 1
    rs = build_retrieval(EvalDataset(name="ld", source="litdata", root=str(tmp_path / "ld"),
                                     caption_keys=["text", "synthetic_caption"]))
    assert rs.captions[0] == ["a red square", "red"] and rs.captions[1] == ["a green square"]  # "" dropped
    with pytest.raises(ValueError, match="classnames"):
        build_classification(EvalDataset(name="ld", source="litdata", root=str(tmp_path / "ld")))


def _litdata_sample(i):
    colour = ["red", "green", "blue"][i % 3]
    b = io.BytesIO()
    _img(colour).save(b, "JPEG")
    return {"key": str(i), "image": b.getvalue(), "text": f"a {colour} square",
            "synthetic_caption": colour if i % 2 == 0 else "", "generated_caption": "", "tags": "", "label": i % 3}


# ---------------------------------------------------------------- callbacks in a Trainer


def _read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc.Tags()


def test_fit_with_val_runs_at_validation_end(eval_data, tmp_path):
    zs = ZeroShotClassification(datasets=[_cls_cfg(eval_data)], class_batch_size=2)
    ret = ZeroShotRetrieval(datasets=[_ret_cfg(eval_data)], recall_k=[1, 5, 10])
    # val_check_interval=0.5 also validates mid-epoch: the benchmarks still run once, at the epoch's last validation
    model, trainer = ToyCLIP(), _trainer(tmp_path, [zs, ret], max_epochs=2, val_check_interval=0.5)
    calls, orig = [], zs.run
    zs.run = lambda tr, pl, direct=False: (
        calls.append((tr.current_epoch, tr.global_step, tr.validating)) or orig(tr, pl, direct)
    )
    trainer.fit(model, datamodule=ToyDM(with_val=True))
    assert calls == [(0, 2, True), (1, 4, True)]  # inside validation, so ModelCheckpoint could monitor them
    m = trainer.callback_metrics
    # 11 of 12 images right (the yellow one in "blue" is closest to... not blue); per class: 1, 1, 3/4
    assert m["zeroshot/colours/top1"].item() == pytest.approx(11 / 12)
    assert m["zeroshot/colours/mean_per_class_recall"].item() == pytest.approx((1 + 1 + 0.75) / 3)
    assert "zeroshot/colours/top5" not in m  # 3 classes
    assert "retrieval/karpathy/image_retrieval_recall@1" in m and "retrieval/karpathy/text_retrieval_recall@10" in m
    assert m["retrieval/karpathy/image_retrieval_recall@10"].item() == 1.0  # 6 images < 10
    assert "zeroshot/colours/top1" in trainer.progress_bar_metrics
    # it ran in eval mode without grad, and training mode came back
    assert model.modes and all(mode == (False, False) for mode in model.modes) and model.training
    assert zs._done_epoch == 1
    tags = _read_scalars(trainer.log_dir)
    assert "zeroshot/colours/top1" in tags["scalars"] and len(tags["scalars"]) >= 5
    assert "zeroshot/colours/confusion_matrix" in tags["images"] and "retrieval/karpathy/top3_captions" in tags["images"]


def test_fit_without_val_and_every_n_epochs(eval_data, tmp_path):
    zs = ZeroShotClassification(datasets=[_cls_cfg(eval_data)], every_n_epochs=2, log_images=False)
    model, trainer = ToyCLIP(), _trainer(tmp_path, [zs], max_epochs=3)
    calls = []
    orig = zs.run
    zs.run = lambda tr, pl, direct=False: calls.append(tr.current_epoch) or orig(tr, pl, direct)
    trainer.fit(model, datamodule=ToyDM(with_val=False))
    assert calls == [1]  # epochs are 0-based: only the second of three
    assert trainer.callback_metrics["zeroshot/colours/top1"].item() == pytest.approx(11 / 12)


def test_validate_and_test_write_clip_benchmark_json(eval_data, tmp_path, capsys):
    zs = ZeroShotClassification(datasets=[_cls_cfg(eval_data)], output_dir=str(tmp_path / "res"))
    ret = ZeroShotRetrieval(datasets=[_ret_cfg(eval_data)], output_dir=str(tmp_path / "res"))
    lp = LinearProbe(datasets=[_cls_cfg(eval_data, probe_train_fraction=0.5)], output_dir=str(tmp_path / "res"))
    model = ToyCLIP()
    out = _trainer(tmp_path, [zs, ret, lp]).validate(model, datamodule=ToyDM(with_val=True))
    assert out[0]["zeroshot/colours/top1"] == pytest.approx(11 / 12)
    rec = json.loads((tmp_path / "res" / "zeroshot_classification_colours.json").read_text())
    assert rec["dataset"] == "colours" and rec["task"] == "zeroshot_classification" and rec["model"] == "ToyCLIP"
    assert rec["metrics"]["acc1"] == pytest.approx(11 / 12) and "mean_per_class_recall" in rec["metrics"]
    r = json.loads((tmp_path / "res" / "zeroshot_retrieval_karpathy.json").read_text())
    assert set(r["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    p = json.loads((tmp_path / "res" / "linear_probe_colours.json").read_text())
    assert p["task"] == "linear_probe" and p["metrics"]["lp_acc1"] >= 0.5 and "weight_decay" in p["extra"]
    printed = capsys.readouterr().out
    assert "zeroshot_classification (metrics in %)" in printed and "91.67" in printed
    # test: same numbers through on_test_epoch_end
    zs2 = ZeroShotClassification(datasets=[_cls_cfg(eval_data)], output_dir=str(tmp_path / "res2"))
    out = _trainer(tmp_path, [zs2]).test(ToyCLIP(), datamodule=ToyDM())
    assert out[0]["zeroshot/colours/top1"] == pytest.approx(11 / 12)


def test_validate_without_val_data_runs_in_teardown(eval_data, tmp_path):
    zs = ZeroShotClassification(datasets=[_cls_cfg(eval_data)], output_dir=str(tmp_path / "res"))
    trainer = _trainer(tmp_path, [zs])
    trainer.validate(ToyCLIP(), datamodule=ToyDM(with_val=False))  # Lightning skips the loop and its hooks
    rec = json.loads((tmp_path / "res" / "zeroshot_classification_colours.json").read_text())
    assert rec["metrics"]["acc1"] == pytest.approx(11 / 12)
    assert "zeroshot/colours/top1" in _read_scalars(trainer.log_dir)["scalars"]


def test_corrupt_image_is_skipped_and_counted(tmp_path, capsys):
    for c in ("blue", "red"):
        (tmp_path / "f" / c).mkdir(parents=True)
        _img(c).save(tmp_path / "f" / c / "ok.png")
    (tmp_path / "f" / "red" / "bad.png").write_bytes(b"not a png")
    zs = ZeroShotClassification(datasets=[dict(name="f", source="imagefolder", root=str(tmp_path / "f"))],
                                output_dir=str(tmp_path / "res"), log_images=False)
    _trainer(tmp_path, [zs]).validate(ToyCLIP(), datamodule=ToyDM())
    assert zs.results["f"]["skipped"] == 1 and zs.results["f"]["num_samples"] == 2
    assert zs.results["f"]["top1"] == 1.0
    assert "skipped 1 sample" in capsys.readouterr().out


def test_fast_dev_run_is_a_one_batch_smoke_test(eval_data, tmp_path):
    zs = ZeroShotClassification(datasets=[_cls_cfg(eval_data)], log_images=False)  # batch_size 5 of 12 images
    ret = ZeroShotRetrieval(datasets=[_ret_cfg(eval_data)], log_images=False)  # batch_size 4 of 6 images
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=True, callbacks=[zs, ret], enable_progress_bar=False)
    trainer.fit(ToyCLIP(), datamodule=ToyDM())
    assert zs.results["colours"]["num_samples"] == 5 and ret.results["karpathy"]["num_samples"] == 4
    assert len(zs._sets[0].indices) == 12  # the full sets are back for the next run


def test_standalone_overrides_and_missing_tokenizer(eval_data, tmp_path):
    class NoIO(L.LightningDataModule):
        def val_dataloader(self):
            return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=2)

    zs = ZeroShotClassification(datasets=[_cls_cfg(eval_data)], image_size=8)
    with pytest.raises(ValueError, match="tokenizer"):
        _trainer(tmp_path, [zs]).validate(ToyCLIP(), datamodule=NoIO())


def test_bf16_precision_is_followed(eval_data, tmp_path):
    zs = ZeroShotClassification(datasets=[_cls_cfg(eval_data)], log_images=False)
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
        every_n_epochs: 2
        datasets:
          - name: colours
            source: imagefolder
            root: {eval_data / 'folder'}
            classnames: {eval_data / 'classnames.json'}
            batch_size: 3
    - class_path: rwkv_clip.callbacks.ZeroShotRetrieval
      init_args:
        datasets:
          - {{name: k, source: karpathy, root: {eval_data / 'folder' / 'test'}, annotations: {eval_data / 'karpathy.json'}}}
""")
    cli = LightningCLI(ToyCLIP, ToyDM, run=False, args=["--config", str(cfg)])
    zs = [c for c in cli.trainer.callbacks if isinstance(c, ZeroShotClassification)][0]
    assert zs.every_n_epochs == 2 and isinstance(zs.datasets[0], EvalDataset) and zs.datasets[0].batch_size == 3
    assert any(isinstance(c, ZeroShotRetrieval) for c in cli.trainer.callbacks)


def test_demo_source_end_to_end(tmp_path):
    """source "demo": generated on first use, classnames/templates from the demo root, 3 texts per image."""
    demo = pytest.importorskip("rwkv_clip.datamodules.demo")
    root = str(tmp_path / "demo")
    demo.ensure_demo_data(root, num_train=8, num_val=4, num_test_per_class=3, image_size=16,
                          shapes=["circle", "square"], colours=["red", "blue"], vocab_size=300)
    cfg = dict(name="demo", source="demo", root=root, batch_size=8)
    zs = ZeroShotClassification(datasets=[cfg], output_dir=str(tmp_path / "res"))
    ret = ZeroShotRetrieval(datasets=[cfg], output_dir=str(tmp_path / "res"))
    lp = LinearProbe(datasets=[cfg], output_dir=str(tmp_path / "res"))
    _trainer(tmp_path, [zs, ret, lp]).validate(ToyCLIP(), datamodule=ToyDM())
    assert zs._sets[0].classnames == ["red circle", "red square", "blue circle", "blue square"]
    assert zs.results["demo"]["num_samples"] == 12 and 0.0 <= zs.results["demo"]["top1"] <= 1.0
    assert ret.results["demo"]["num_texts"] > 12  # several distinct captions per image
    assert lp.results["demo"]["num_samples"] == 6  # half of the 12 test images, the other half fits the probe
    for task in ("zeroshot_classification", "zeroshot_retrieval", "linear_probe"):
        assert (tmp_path / "res" / f"{task}_demo.json").is_file()


# ---------------------------------------------------------------- DDP


def test_ddp_matches_single_process(eval_data, tmp_path):
    """2 CPU ranks (gloo) each embed half of every set; gathered metrics equal the 1-process ones."""
    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__, "ddp", str(out), str(eval_data)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    single = _run_ddp_worker_body(eval_data, tmp_path / "single", devices=1)
    assert got["results"] == single["results"]
    assert single["seen"] == [12 + 6] and got["shard_sizes"] == [9, 9]  # each rank embedded half of each set


def _run_ddp_worker_body(eval_data, out_dir, devices):
    class Sizes(ToyCLIP):
        def encode_image(self, images):
            self.seen = getattr(self, "seen", 0) + len(images)
            return super().encode_image(images)

    zs = ZeroShotClassification(datasets=[_cls_cfg(eval_data, max_samples=None)], log_images=False)
    ret = ZeroShotRetrieval(datasets=[_ret_cfg(eval_data)], log_images=False)
    model = Sizes()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        callbacks=[zs, ret], default_root_dir=out_dir,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, datamodule=ToyDM())
    seen = trainer.strategy.all_gather(torch.tensor(model.seen)).tolist() if devices > 1 else [model.seen]
    results = {k: {m: round(v, 6) for m, v in r.items()} for c in (zs, ret) for k, r in c.results.items()}
    return {"results": results, "seen": seen, "rank": trainer.global_rank}


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "ddp":
    res = _run_ddp_worker_body(Path(sys.argv[3]), None, devices=2)
    if res["rank"] == 0:
        Path(sys.argv[2]).write_text(json.dumps({"results": res["results"], "shard_sizes": res["seen"]}))
