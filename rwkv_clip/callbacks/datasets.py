"""Local evaluation data for the benchmark callbacks: configs, sources and label / caption files.

Nothing is downloaded. Every source yields PIL images by index; labels (classification) or captions (retrieval)
come with it. Classnames and templates are JSON files keyed by dataset name (CLIP_benchmark's format).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from PIL import Image

Source = Literal["imagefolder", "cifar10", "cifar100", "litdata", "karpathy", "csv", "demo"]
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEMO_CAPTION_KEYS = ["text", "synthetic_caption", "generated_caption"]


@dataclass
class EvalDataset:
    """One evaluation set, as written in YAML under a callback's ``datasets:`` list.

    Args:
        name: used in metric names (``zeroshot/<name>/top1``) and, by default, as the key into the classnames /
            templates JSON.
        source: imagefolder | cifar10 | cifar100 | litdata | karpathy | csv | demo.
        root: ImageFolder root (``root/<split>`` if that exists), CIFAR root (torchvision layout), LitData dir
            (``root/<split>`` if that exists), image root for karpathy / csv, or the demo's root (``data/demo``).
        split: test | val | train ...; karpathy keeps ``images[].split == split``; CIFAR: ``train`` or else test.
        classnames: JSON file keyed by dataset name, names in label order. Default: shipped (CIFAR),
            ``root/classnames.json`` (demo), the folder names of an ImageFolder whose folders are not WordNet ids.
        templates: JSON file keyed by dataset name, ``{c}`` marks the class name. Default: shipped (ImageNet's 80,
            CIFAR's 18; unknown names get the ImageNet ones), ``root/templates.json`` (demo).
        key: the key to read in those JSON files when it is not ``name`` (e.g. name imagenet, key imagenet1k).
        annotations: Karpathy JSON or CSV file (retrieval). CSV: one row per (image, caption), grouped by image.
        image_key: CSV column of the image path (default filepath) or LitData field (default image).
        caption_keys: CSV columns or LitData fields holding captions; each non-empty one is a caption of the image.
            Default: [caption] (CSV), [text] (litdata), [text, synthetic_caption, generated_caption] (demo).
        label_key: LitData field of the int class label.
        batch_size: images (and texts) per forward.
        num_workers: DataLoader workers for decoding images.
        max_samples: evaluate a fixed, seeded random subset of this many images (retrieval: with their captions).
        train_split: LinearProbe only: the split to fit the probe on (e.g. train for CIFAR).
        probe_train_fraction: LinearProbe without train_split: the eval set is split (seeded), this share fits.
        metric: headline metric (progress bar): top1 | mean_per_class_recall | a retrieval metric; by default
            mean_per_class_recall for pets, flowers, caltech101, fgvc_aircraft (DESIGN §6), else top1 / T->I R@1.
    """

    name: str
    source: Source
    root: str
    split: str = "test"
    classnames: Optional[str] = None
    templates: Optional[str] = None
    key: Optional[str] = None
    annotations: Optional[str] = None
    image_key: Optional[str] = None
    caption_keys: Optional[list[str]] = None
    label_key: str = "label"
    batch_size: int = 64
    num_workers: int = 0
    max_samples: Optional[int] = None
    train_split: Optional[str] = None
    probe_train_fraction: float = 0.5
    metric: Optional[str] = None


def as_config(d: EvalDataset | dict) -> EvalDataset:
    """Accept dataclasses (jsonargparse) and plain dicts (Python users)."""
    if isinstance(d, EvalDataset):
        return d
    if isinstance(d, dict):
        return EvalDataset(**d)
    raise TypeError(f"dataset config must be an EvalDataset or a dict, got {type(d).__name__}")


# ---------------------------------------------------------------- image sources (PIL by index, picklable)


class FileImages:
    def __init__(self, paths: Sequence[str], labels: Optional[Sequence[int]] = None):
        self.paths, self.labels = list(paths), (list(labels) if labels is not None else None)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB"), (self.labels[i] if self.labels is not None else -1)


class ArrayImages:
    """CIFAR's in-memory uint8 (N, 32, 32, 3) array."""

    def __init__(self, data, labels: Sequence[int]):
        self.data, self.labels = data, list(labels)

    def __len__(self) -> int:
        return len(self.data)

    def load(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[i]), self.labels[i]


class LitDataImages:
    """A prepared LitData directory (INTERFACES.md schema), read by global sample index, opened lazily per worker."""

    def __init__(self, directory: str, image_key: str = "image", label_key: Optional[str] = None):
        self.directory, self.image_key, self.label_key = directory, image_key, label_key
        index = Path(directory) / "index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{directory} is not a prepared LitData directory (no index.json)")
        # The total count straight from the index: StreamingDataset.__len__ is per rank under DDP.
        self.num_samples = sum(c["chunk_size"] for c in json.loads(index.read_text())["chunks"])
        self._ds = None

    def __getstate__(self):
        return {**self.__dict__, "_ds": None}

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, i: int) -> dict[str, Any]:
        if self._ds is None:
            from litdata import StreamingDataset

            self._ds = StreamingDataset(self.directory)
        return self._ds[int(i)]

    def load(self, i: int) -> tuple[Image.Image, int]:
        s = self.sample(i)
        if self.image_key not in s:
            raise KeyError(f"{self.directory}: sample has no field {self.image_key!r} (fields: {sorted(s)})")
        label = -1
        if self.label_key is not None:
            if self.label_key not in s:
                raise KeyError(
                    f"{self.directory}: classification needs an int field {self.label_key!r} per sample "
                    f"(fields: {sorted(s)}); set label_key"
                )
            label = int(s[self.label_key])
        img = s[self.image_key]
        img = Image.open(io.BytesIO(img)) if isinstance(img, (bytes, bytearray)) else img
        return img.convert("RGB"), label


class EvalImages(torch.utils.data.Dataset):
    """(image tensor, label, j) for the j-th chosen index; a sample that fails to load yields None (skipped)."""

    def __init__(self, source, indices: Sequence[int], transform: Callable):
        self.source, self.indices, self.transform = source, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = self.indices[j]
        try:
            img, label = self.source.load(i)
            return self.transform(img), label, j
        except (OSError, ValueError, SyntaxError) as e:  # corrupt / truncated image files
            print(f"[eval] skipping sample {i}: {type(e).__name__}: {e}")
            return None


def collate_skip_none(batch):
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    imgs, labels, idx = zip(*batch)
    return torch.stack(imgs), torch.tensor(labels), torch.tensor(idx)


def clip_eval_transform(image_size: int):
    """Resize the shortest side (bicubic), centre crop, CLIP normalisation: the same as dm.eval_transform."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


# ---------------------------------------------------------------- classnames / templates


def shipped_path(filename: str) -> str:
    return str(resources.files("rwkv_clip") / "data" / filename)


def read_keyed_json(path: str, key: str, what: str, fallback_key: Optional[str] = None) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist; give a JSON file keyed by dataset name")
    try:
        table = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None
    if not isinstance(table, dict):
        raise ValueError(f"{what} file {path} must hold a JSON object keyed by dataset name")
    if key not in table and fallback_key is not None and fallback_key in table:
        key = fallback_key
    if key not in table:
        raise KeyError(f"{what} file {path} has no entry {key!r} (it has: {sorted(table)}); set the dataset's 'key'")
    value = table[key]
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{what} file {path}, entry {key!r}: expected a non-empty list of strings")
    return value


def resolve_templates(cfg: EvalDataset) -> list[str]:
    key = cfg.key or ("demo" if cfg.source == "demo" else cfg.name)
    if cfg.templates:
        return read_keyed_json(cfg.templates, key, "templates")
    if cfg.source == "demo":
        return read_keyed_json(os.path.join(cfg.root, "templates.json"), key, "templates")
    # Like CLIP_benchmark, datasets without their own templates get the 80 ImageNet ones.
    return read_keyed_json(shipped_path("templates.json"), key, "templates", fallback_key="imagenet1k")


def resolve_classnames(cfg: EvalDataset, folder_names: Optional[list[str]] = None) -> list[str]:
    key = cfg.key or ("demo" if cfg.source == "demo" else cfg.name)
    if cfg.classnames:
        return read_keyed_json(cfg.classnames, key, "classnames")
    if cfg.source == "demo":
        return read_keyed_json(os.path.join(cfg.root, "classnames.json"), key, "classnames")
    if cfg.source in ("cifar10", "cifar100"):
        return read_keyed_json(shipped_path("classnames.json"), cfg.key or cfg.source, "classnames")
    if folder_names is not None:
        if any(re.fullmatch(r"n\d{8}", f) for f in folder_names):
            raise ValueError(
                f"dataset {cfg.name!r}: the folders under {cfg.root} are WordNet ids; give 'classnames', a JSON file "
                "keyed by dataset name with readable names (CLIP_benchmark's en_classnames.json has imagenet1k)"
            )
        return [f.replace("_", " ") for f in folder_names]
    raise ValueError(
        f"dataset {cfg.name!r} (source {cfg.source}): give 'classnames', a JSON file keyed by dataset name"
    )


# ---------------------------------------------------------------- builders


def _require_dir(path: str, cfg: EvalDataset, what: str = "root") -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset {cfg.name!r}: {what} {path} does not exist or is not a directory")


def _subset(n: int, max_samples: Optional[int], seed: int = 0) -> list[int]:
    if max_samples is None or max_samples >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:max_samples].tolist())


def _ensure_demo(cfg: EvalDataset) -> None:
    try:
        from rwkv_clip.datamodules.demo import ensure_demo_data
    except ImportError:
        return
    ensure_demo_data(cfg.root)


def _split_dir(root: str, split: str) -> str:
    return os.path.join(root, split) if split and os.path.isdir(os.path.join(root, split)) else root


@dataclass
class ClassificationSet:
    cfg: EvalDataset
    source: Any
    indices: list[int]
    classnames: list[str]
    templates: list[str]

    def head(self, n: int) -> "ClassificationSet":
        return replace(self, indices=self.indices[:n])


@dataclass
class RetrievalSet:
    cfg: EvalDataset
    source: Any
    indices: list[int]  # images to evaluate, in order; image j of the eval = source item indices[j]
    captions: list[list[str]]  # captions[j] for image j

    def head(self, n: int) -> "RetrievalSet":
        return replace(self, indices=self.indices[:n], captions=self.captions[:n])


def build_classification(cfg: EvalDataset, split: Optional[str] = None, need_prompts: bool = True) -> ClassificationSet:
    split = cfg.split if split is None else split
    folder_names = None
    if cfg.source == "demo":
        _ensure_demo(cfg)
    _require_dir(cfg.root, cfg)
    if cfg.source == "imagefolder":
        from torchvision.datasets import ImageFolder

        d = _split_dir(cfg.root, split)
        try:
            tv = ImageFolder(d)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"dataset {cfg.name!r}: no class folders with images in {d}: {e}") from None
        folder_names = tv.classes
        source = FileImages([p for p, _ in tv.samples], tv.targets)
        num_classes = len(tv.classes)
    elif cfg.source in ("cifar10", "cifar100"):
        from torchvision.datasets import CIFAR10, CIFAR100

        cls = CIFAR10 if cfg.source == "cifar10" else CIFAR100
        try:
            tv = cls(cfg.root, train=(split == "train"), download=False)
        except RuntimeError as e:
            raise FileNotFoundError(
                f"dataset {cfg.name!r}: {cfg.root} has no {cfg.source} in torchvision's on-disk format "
                f"({cls.base_folder}/ with the python pickles); nothing is downloaded ({e})"
            ) from None
        source = ArrayImages(tv.data, tv.targets)
        num_classes = len(tv.classes)
    elif cfg.source in ("litdata", "demo"):
        d = _split_dir(cfg.root, split)
        source = LitDataImages(d, image_key=cfg.image_key or "image", label_key=cfg.label_key)
        num_classes = None
    else:
        raise ValueError(f"dataset {cfg.name!r}: source {cfg.source!r} is for retrieval, not classification")
    # The linear probe needs no prompts; classnames then only label the pictures (LitData may have none).
    need_names = need_prompts or cfg.source != "litdata" or cfg.classnames
    classnames = resolve_classnames(cfg, folder_names) if need_names else []
    if num_classes is not None and classnames and len(classnames) != num_classes:
        raise ValueError(f"dataset {cfg.name!r}: {len(classnames)} classnames for {num_classes} classes in {cfg.root}")
    templates = resolve_templates(cfg) if need_prompts else []
    return ClassificationSet(cfg, source, _subset(len(source), cfg.max_samples), classnames, templates)


def build_retrieval(cfg: EvalDataset) -> RetrievalSet:
    if cfg.source == "demo":
        _ensure_demo(cfg)
    _require_dir(cfg.root, cfg)
    if cfg.source in ("karpathy", "csv"):
        if not cfg.annotations or not os.path.isfile(cfg.annotations):
            raise FileNotFoundError(
                f"dataset {cfg.name!r}: annotations file {cfg.annotations!r} does not exist "
                f"(source {cfg.source} needs a {'Karpathy JSON' if cfg.source == 'karpathy' else 'CSV'} file)"
            )
        paths, captions = (_read_karpathy if cfg.source == "karpathy" else _read_csv)(cfg)
        source = FileImages([os.path.join(cfg.root, p) for p in paths])
        missing = [p for p in source.paths[:1] if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"dataset {cfg.name!r}: image {missing[0]} not found; is root the image root?")
    elif cfg.source in ("litdata", "demo"):
        keys = cfg.caption_keys or (DEMO_CAPTION_KEYS if cfg.source == "demo" else ["text"])
        source = LitDataImages(_split_dir(cfg.root, cfg.split), image_key=cfg.image_key or "image")
        captions = []
        for i in range(len(source)):
            s = source.sample(i)
            caps = [s[k] for k in keys if isinstance(s.get(k), str) and s[k].strip()]
            captions.append(list(dict.fromkeys(caps)))  # identical texts of one image count once
    else:
        raise ValueError(
            f"dataset {cfg.name!r}: source {cfg.source!r} has no captions; use karpathy, csv, litdata or demo"
        )
    idx = _subset(len(source), cfg.max_samples)
    sel = [i for i in idx if captions[i]]
    if not sel:
        raise ValueError(f"dataset {cfg.name!r}: no image with a caption in {cfg.root} (split {cfg.split!r})")
    return RetrievalSet(cfg, source, sel, [captions[i] for i in sel])


def _read_karpathy(cfg: EvalDataset) -> tuple[list[str], list[list[str]]]:
    data = json.loads(Path(cfg.annotations).read_text())
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{cfg.annotations}: expected Karpathy format {{'images': [{{filename, sentences, split}}]}}")
    paths, captions = [], []
    for im in data["images"]:
        if im.get("split") != cfg.split:
            continue
        paths.append(os.path.join(im.get("filepath", ""), im["filename"]))
        captions.append([s["raw"].strip() for s in im.get("sentences", []) if s.get("raw", "").strip()])
    if not paths:
        splits = sorted({str(im.get("split")) for im in data["images"]})
        raise ValueError(f"{cfg.annotations}: no image with split {cfg.split!r} (splits present: {splits})")
    return paths, captions


def _read_csv(cfg: EvalDataset) -> tuple[list[str], list[list[str]]]:
    groups: dict[str, list[str]] = {}
    with open(cfg.annotations, newline="") as f:
        reader = csv.DictReader(f)
        image_key, caption_keys = cfg.image_key or "filepath", cfg.caption_keys or ["caption"]
        cols = [image_key, *caption_keys]
        missing = [c for c in cols if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{cfg.annotations}: no column(s) {missing} (columns: {reader.fieldnames}); "
                "set image_key / caption_keys"
            )
        for row in reader:
            caps = groups.setdefault(row[image_key], [])
            caps += [row[c].strip() for c in caption_keys if row[c] and row[c].strip()]
    return list(groups), list(groups.values())
