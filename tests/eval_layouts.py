"""Tiny copies of CLIP_benchmark's evaluation sets, each in the layout its users have on disk.

Every image says which class (or caption group) it was written for through its width: ``8 + k`` pixels for
class k of the writer's class list (a JPEG keeps its size exactly), so a test can check each loaded label
against the class it was written under, whatever order the reader lists the samples in.

Each ``make_<name>(root)`` writes the set under ``root`` and returns what a reader should find: the class names
in label order (as CLIP_benchmark names them) or the captions, and the number of test samples.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(230, 20, 20), (20, 200, 30), (25, 30, 220), (220, 210, 20), (200, 40, 200), (20, 200, 200)]


def image(k: int, colour: int = 0) -> Image.Image:
    """Class (or image) k: 8 + k pixels wide."""
    return Image.fromarray(np.full((6, 8 + k, 3), COLOURS[colour % len(COLOURS)], np.uint8))


def marker(img: Image.Image) -> int:
    return img.size[0] - 8


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95) if path.suffix.lower() in (".jpg", ".jpeg") else img.save(path)


def make_cifar(root: Path, name: str = "cifar10") -> dict:
    """torchvision's layout of the python version (pickled dicts). Its md5 checks must be patched for these."""
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    if name == "cifar100":
        classes = [f"class_{i}" for i in range(98)] + ["aquarium_fish", "maple_tree"]
    labels = [len(classes) - 1, 0, 1, len(classes) - 2, 3]  # test samples, in file order
    data = np.zeros((len(labels), 3072), np.uint8)
    data[:, :1024] = np.array(labels)[:, None] % 256  # red channel = label (checked against the loaded label)
    label_field, meta_key = ("labels", "label_names") if name == "cifar10" else ("fine_labels", "fine_label_names")
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    batch = {"data": data, label_field: labels}
    files = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for f in files if name == "cifar10" else ["train", "test"]:
        (folder / f).write_bytes(pickle.dumps(batch))
    (folder / ("batches.meta" if name == "cifar10" else "meta")).write_bytes(pickle.dumps({meta_key: classes}))
    return {"classnames": classes, "n": len(labels), "labels": labels}


def patch_torchvision_checksums(monkeypatch=None) -> None:
    """The tiny CIFAR pickles and Flowers .mat files are not the published files, whose md5 torchvision checks."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.flowers102 as flowers

    for obj, attr, value in ((cifar, "check_integrity", lambda *a, **k: True),
                             (cifar.CIFAR10, "_check_integrity", lambda self: True),
                             (flowers, "check_integrity", lambda *a, **k: True)):
        (monkeypatch.setattr(obj, attr, value) if monkeypatch else setattr(obj, attr, value))


def make_food101(root: Path) -> dict:
    classes = ["apple_pie", "baby_back_ribs", "beignets"]
    base, test = root / "food-101", {}
    for k, c in enumerate(classes):
        ids = [f"{c}/{1000 + j}" for j in range(k + 1)]
        test[c] = ids
        for i in ids:
            _save(image(k), base / "images" / f"{i}.jpg")
    _save(image(0), base / "images" / "apple_pie" / "9.jpg")  # a train image
    (base / "meta").mkdir(parents=True, exist_ok=True)
    (base / "meta" / "test.json").write_text(json.dumps(test))
    (base / "meta" / "train.json").write_text(json.dumps({c: (["apple_pie/9"] if c == "apple_pie" else [])
                                                           for c in classes}))
    return {"classnames": [c.replace("_", " ") for c in classes], "n": 6}


def make_pets(root: Path) -> dict:
    breeds = [("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 1)]  # class ids 1..3, species 1 cat 2 dog
    base = root / "oxford-iiit-pet"
    lines = []
    for k, (breed, species) in enumerate(breeds):
        for j in range(2):
            _save(image(k), base / "images" / f"{breed}_{j + 1}.jpg")
            lines.append(f"{breed}_{j + 1} {k + 1} {species} {j + 1}")
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    (base / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")
    (base / "annotations" / "trainval.txt").write_text("\n".join(lines[:3]) + "\n")
    return {"classnames": ["Abyssinian", "American Bulldog", "Bengal"], "n": 6}


def make_flowers(root: Path) -> dict:
    """102 classes in the .mat label file; 6 test images of classes 0, 1, 5 (labels are 1-based there)."""
    import scipy.io

    base = root / "flowers-102"
    labels = [1, 2, 6, 6, 2, 1, 3, 4]  # image ids 1..8
    for i, label in enumerate(labels, 1):
        _save(image(label - 1), base / "jpg" / f"image_{i:05d}.jpg")
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array(labels + [102])})
    scipy.io.savemat(base / "setid.mat", {"tstid": np.arange(1, 7), "trnid": np.array([7, 8]), "valid": np.array([7, 8])})
    return {"n": 6}


def make_sun397(root: Path) -> dict:
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bedroom"]
    base = root / "SUN397"
    base.mkdir(parents=True, exist_ok=True)
    (base / "ClassName.txt").write_text("\n".join(classes) + "\n")
    for k, c in enumerate(classes):
        for j in range(2):
            _save(image(k), base / c.strip("/") / f"sun_{k}{j}.jpg")
    return {"classnames": ["abbey", "apartment building outdoor", "bedroom"], "n": 6}


def make_cars(root: Path) -> dict:
    import scipy.io

    base = root / "stanford_cars"
    classes = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(classes, dtype=object)})
    rows = []
    for j, k in enumerate([2, 0, 1, 2]):
        _save(image(k), base / "cars_test" / f"{j:05d}.jpg")
        rows.append((f"{j:05d}.jpg", k + 1))
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat",
                     {"annotations": np.array(rows, dtype=[("fname", "O"), ("class", "O")])})
    return {"classnames": classes, "n": 4}


def make_dtd(root: Path) -> dict:
    classes = ["banded", "blotchy", "braided"]
    base = root / "dtd" / "dtd"
    lines = []
    for k, c in enumerate(classes):
        for j in range(2):
            _save(image(k), base / "images" / c / f"{c}_{j}.jpg")
            lines.append(f"{c}/{c}_{j}.jpg")
    (base / "labels").mkdir(parents=True, exist_ok=True)
    (base / "labels" / "test1.txt").write_text("\n".join(lines[::-1]) + "\n")
    return {"classnames": classes, "n": 6}


def make_caltech101(root: Path, folders: list[str]) -> dict:
    """CLIP_benchmark's Caltech-101: every category folder, BACKGROUND_Google included, images image_NNNN.jpg."""
    base = root / "caltech101" / "101_ObjectCategories"
    for k, c in enumerate(sorted(folders)):
        for j in range(1 + k % 2):
            _save(image(k), base / c / f"image_{j + 1:04d}.jpg")
    (root / "caltech101" / "Annotations").mkdir(parents=True, exist_ok=True)
    return {"n": sum(1 + k % 2 for k in range(len(folders)))}


def make_fgvc_aircraft(root: Path) -> dict:
    classes = ["707-320", "727-200", "A300B4"]
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "variants.txt").write_text("\n".join(classes) + "\n")
    lines = []
    for j, k in enumerate([1, 0, 2, 1]):
        _save(image(k), data / "images" / f"{100 + j:07d}.jpg")
        lines.append(f"{100 + j:07d} {classes[k]}")
    (data / "images_variant_test.txt").write_text("\n".join(lines) + "\n")
    return {"classnames": classes, "n": 4}


def make_imagenet1k(root: Path, meta: bool = True) -> dict:
    """1000 WordNet-id folders under root/val, one image each for the first 3, a tiny PNG for the rest."""
    import torch

    wnids = [f"n{10000000 + 7 * i:08d}" for i in range(1000)]
    for k, w in enumerate(wnids):
        _save(image(k % 40) if k >= 3 else image(k), root / "val" / w / f"ILSVRC2012_val_{k:08d}.JPEG")
    if meta:
        torch.save(({w: (f"name {i}",) for i, w in enumerate(wnids)}, wnids), root / "meta.bin")
    return {"wnids": wnids, "n": 1000}


COCO_CAPTIONS = [["a red square.", "red"], ["a green square", "green thing", "grass"], ["blue"]]


def make_mscoco_captions(root: Path) -> dict:
    images, annotations = [], []
    for i, caps in enumerate(COCO_CAPTIONS):
        name = f"COCO_val2014_{i:012d}.jpg"
        _save(image(i, colour=i), root / "val2014" / name)
        images.append({"id": 10 + i, "file_name": name})
        annotations += [{"id": 100 + 10 * i + j, "image_id": 10 + i, "caption": c} for j, c in enumerate(caps)]
    (root / "coco_test_karpathy.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return {"captions": COCO_CAPTIONS, "n": len(COCO_CAPTIONS)}


def make_flickr30k(root: Path) -> dict:
    lines = ["image,caption"]
    for i, caps in enumerate(COCO_CAPTIONS):
        _save(image(i, colour=i), root / f"{1000 + i}.jpg")
        lines += [f"{1000 + i}.jpg,{c}" for c in caps]
    lines.append("1001.jpg,a caption, with a comma")
    (root / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    captions = [list(c) for c in COCO_CAPTIONS]
    captions[1].append("a caption, with a comma")
    return {"captions": captions, "n": len(captions)}


def make_all(root: Path) -> dict[str, dict]:
    """Every set of configs/eval/clip_benchmark.yaml under root/<name>. Caltech-101 gets CLIP_benchmark's 102
    folders (their names are passed in by the caller, who has the list)."""
    return {
        "cifar10": make_cifar(root / "cifar10", "cifar10"),
        "cifar100": make_cifar(root / "cifar100", "cifar100"),
        "food101": make_food101(root / "food101"),
        "pets": make_pets(root / "pets"),
        "flowers": make_flowers(root / "flowers"),
        "sun397": make_sun397(root / "sun397"),
        "cars": make_cars(root / "cars"),
        "dtd": make_dtd(root / "dtd"),
        "fgvc_aircraft": make_fgvc_aircraft(root / "fgvc_aircraft"),
        "imagenet1k": make_imagenet1k(root / "imagenet1k"),
        "mscoco_captions": make_mscoco_captions(root / "mscoco_captions"),
        "flickr30k": make_flickr30k(root / "flickr30k"),
    }
