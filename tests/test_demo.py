"""The demo generator: determinism, idempotence, class/label consistency, and the DemoDataModule."""

import io
import json
import os

import numpy as np
import pytest
import torch
from litdata import StreamingDataset
from PIL import Image

from rwkv_clip.datamodules import ImageTextDataModule
from rwkv_clip.datamodules.demo import COLOURS, DemoDataModule, ensure_demo_data
from rwkv_clip.tokenizer import Tokenizer

SMALL = dict(num_train=120, num_val=16, num_test_per_class=3, shapes=["circle", "triangle", "cross"],
             colours=["red", "blue"], vocab_size=300, image_size=32)


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            if n in ("index.json", ".lock"):  # litdata stamps index.json with a time
                continue
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_data(str(tmp_path_factory.mktemp("demo") / "demo"), **SMALL)


def test_same_seed_same_bytes_other_seed_differs(demo, tmp_path):
    again = ensure_demo_data(str(tmp_path / "again"), **SMALL)
    a, b = _files(demo), _files(again)
    assert set(a) == set(b) and any(k.startswith("train/chunk") for k in a)
    assert all(a[k] == b[k] for k in a)
    other = _files(ensure_demo_data(str(tmp_path / "other"), **{**SMALL, "seed": 1}))
    assert a["train/" + "chunk-0-0.bin"] != other["train/chunk-0-0.bin"]


def test_idempotent_and_regenerated_on_parameter_change(demo, tmp_path):
    root = str(tmp_path / "d")
    ensure_demo_data(root, **SMALL)
    stamp = os.path.getmtime(os.path.join(root, "manifest.json"))
    ensure_demo_data(root, **SMALL)
    ensure_demo_data(root)  # no parameters (as the eval callbacks call it): keep what is there
    assert os.path.getmtime(os.path.join(root, "manifest.json")) == stamp
    ensure_demo_data(root, **{**SMALL, "colours": ["red", "green"]})
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    assert manifest["params"]["colours"] == ["red", "green"]
    assert json.load(open(os.path.join(root, "classnames.json")))["demo"][3] == "green circle"
    assert not [n for n in os.listdir(root) if n.startswith(".tmp")]


def test_classes_labels_and_captions_agree(demo):
    classnames = json.load(open(os.path.join(demo, "classnames.json")))["demo"]
    templates = json.load(open(os.path.join(demo, "templates.json")))["demo"]
    assert classnames == [f"{c} {s}" for c in SMALL["colours"] for s in SMALL["shapes"]]
    assert len(templates) >= 4 and all("{c}" in t for t in templates)
    test = StreamingDataset(os.path.join(demo, "test"))
    assert len(test) == len(classnames) * SMALL["num_test_per_class"]
    labels = []
    for i in range(len(test)):
        s = test[i]
        label = s["label"]
        labels.append(label)
        colour, shape = classnames[label].split()
        assert f"{colour} {shape}" in s["synthetic_caption"]
        assert colour in s["generated_caption"] and shape in s["generated_caption"]
        image = np.asarray(Image.open(io.BytesIO(s["image"])).convert("RGB"), dtype=np.float32)
        assert image.shape == (32, 32, 3)
        # The shape is drawn in its colour: a good part of the pixels lie near the nominal RGB.
        near = np.linalg.norm(image - np.array(COLOURS[colour], dtype=np.float32), axis=-1) < 60
        assert near.mean() > 0.03, (i, classnames[label])
    assert sorted(set(labels)) == list(range(len(classnames)))
    assert all(labels.count(k) == SMALL["num_test_per_class"] for k in set(labels))


def test_three_texts_differ_in_style(demo):
    train = StreamingDataset(os.path.join(demo, "train"))
    samples = [train[i] for i in range(len(train))]
    assert len(samples) == SMALL["num_train"]
    raw = [s["text"] for s in samples]
    assert any(r == "" for r in raw)  # some samples lack the raw text: the loader draws among the others
    templated = [s["synthetic_caption"] for s in samples]
    assert all(t.startswith(("a ", "an ")) and t.endswith(".") for t in templated)
    assert 0.25 < sum(t.endswith("background.") for t in templated) / len(templated) < 0.75
    assert len({s["generated_caption"] for s in samples}) > len({s["synthetic_caption"] for s in samples})
    assert sum(len(s["generated_caption"]) for s in samples) > sum(len(r) for r in raw)


def test_tokenizer_trained_on_demo_captions(demo):
    tok = Tokenizer.load(os.path.join(demo, "tokenizer.json"))
    assert tok.vocab_size <= SMALL["vocab_size"] and (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 1, 2)
    caption = StreamingDataset(os.path.join(demo, "train"))[0]["synthetic_caption"]
    assert len(tok.encode(caption)) < len(caption) / 2  # frequent words became (near) single tokens
    assert tok.decode(tok(caption)[0]) == caption


def test_demo_datamodule_batches(demo):
    dm = DemoDataModule(root=demo, **{k: v for k, v in SMALL.items() if k != "image_size"},
                        data_image_size=SMALL["image_size"], image_size=16, context_length=24, batch_size=8,
                        num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    images, tokens = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 16, 16) and tokens.shape == (8, 24) and tokens.dtype == torch.long
    assert dm.classnames == json.load(open(os.path.join(demo, "classnames.json")))["demo"]
    assert dm.eval_transform(Image.new("RGB", (32, 32))).shape == (3, 16, 16)
    assert dm.tokenizer.vocab_size <= SMALL["vocab_size"]
    assert os.path.isdir(dm.test_dir) and dm.val_dataloader() is not None


def test_demo_data_are_generated_only_in_prepare_data(tmp_path):
    """Building the module (and reading the vocabulary the text tower gets) writes nothing; reading before
    prepare_data fails on the missing folder, as for any prepared data."""
    root = tmp_path / "demo"
    dm = DemoDataModule(root=str(root), **{k: v for k, v in SMALL.items() if k != "image_size"},
                        data_image_size=SMALL["image_size"], image_size=16, context_length=24, batch_size=8,
                        num_workers=0)
    assert dm.vocab_size == SMALL["vocab_size"] and not root.exists()
    with pytest.raises(FileNotFoundError, match="train_dir"):
        dm.setup("fit")
    assert not (root / "train").exists()


def test_demo_is_plain_prepared_data(demo):
    """The demo's folders are what `prepare` writes: a plain ImageTextDataModule streams train and val, and the
    held-out test split is an evaluation set with an int label per sample."""
    dm = ImageTextDataModule(train_dir=os.path.join(demo, "train"), val_dir=os.path.join(demo, "val"),
                             tokenizer=os.path.join(demo, "tokenizer.json"), image_size=16, context_length=24,
                             batch_size=8, num_workers=0)
    dm.setup("fit")
    images, tokens = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 16, 16) and tokens.shape == (8, 24)
    assert dm.train_dataset.fields is not None and "label" in dm.train_dataset.fields
    assert sum(len(b[1]) for b in dm.val_dataloader()) == SMALL["num_val"]
    assert not [n for n in os.listdir(os.path.join(demo, "train")) if n.endswith(".index.json")]


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="shapes"):
        ensure_demo_data(str(tmp_path / "x"), shapes=["circle", "blob"])
    with pytest.raises(TypeError, match="unknown demo data parameter"):
        ensure_demo_data(str(tmp_path / "x"), num_images=3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ensure_demo_data(str(tmp_path / "x"), shapes=["circle"], colours=["red"])


def test_every_supported_shape_and_colour_renders():
    from rwkv_clip.datamodules.demo import SHAPES, render

    rng = np.random.default_rng(0)
    for i, shape in enumerate(SHAPES):
        colour = list(COLOURS)[i % len(COLOURS)]
        image, attrs = render(rng, 48, shape, colour)
        pixels = np.asarray(image, dtype=np.float32)
        assert pixels.shape == (48, 48, 3) and attrs["shape"] == shape and attrs["colour"] == colour
        near = np.linalg.norm(pixels - np.array(COLOURS[colour], dtype=np.float32), axis=-1) < 60
        assert 0.03 < near.mean() < 0.7, shape
