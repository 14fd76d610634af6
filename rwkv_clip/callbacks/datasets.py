"""Evaluation sets, read from the layouts users already have, with CLIP_benchmark's class names and templates.

Nothing is downloaded. CLIP_benchmark's own sets go through torchvision's dataset classes with ``download=False``,
exactly as CLIP_benchmark's ``build_dataset`` builds them; ``imagefolder``, ``litdata`` and ``karpathy`` read your
own sets. Every set is a torch Dataset of ``(PIL image, target)``: an int label for classification, the list of
captions for retrieval.

Class names are tied to labels by identity. An ImageFolder's labels are its sorted folder names, so a class-names
file must name exactly those folders (in any order). For the other sets the dataset class defines the label ids
and a file lists the names in label order (CLIP_benchmark's format); a file whose names are the dataset's own class
names in another order is refused.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Optional, Sequence

import torch
from PIL import Image

from rwkv_clip.schema import IMAGE, LABEL, TEXT_FIELDS, check_prepared_dir

Source = Literal["imagefolder", "litdata", "karpathy"]

_TORCHVISION_HINT = "or let torchvision fetch it once: torchvision.datasets.{cls}(root, download=True)"
# CLIP_benchmark's names of the paper's sets: (title in the paper's table, the layout under root, where to get it).
CLASSIFICATION_SETS = {
    "cifar10": ("CIFAR-10", "root/cifar-10-batches-py/ (the 'python version')",
                "https://www.cs.toronto.edu/~kriz/cifar.html, " + _TORCHVISION_HINT.format(cls="CIFAR10")),
    "cifar100": ("CIFAR-100", "root/cifar-100-python/ (the 'python version')",
                 "https://www.cs.toronto.edu/~kriz/cifar.html, " + _TORCHVISION_HINT.format(cls="CIFAR100")),
    "food101": ("Food-101", "root/food-101/{images/<class>/*.jpg, meta/test.json}",
                "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/, " + _TORCHVISION_HINT.format(cls="Food101")),
    "pets": ("Pets", "root/oxford-iiit-pet/{images/*.jpg, annotations/test.txt}",
             "https://www.robots.ox.ac.uk/~vgg/data/pets/, " + _TORCHVISION_HINT.format(cls="OxfordIIITPet")),
    "flowers": ("Flowers", "root/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat} (needs scipy)",
                "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/, " + _TORCHVISION_HINT.format(cls="Flowers102")),
    "sun397": ("SUN397", "root/SUN397/{ClassName.txt, a/abbey/sun_*.jpg, ...} (the whole set, as CLIP_benchmark)",
               "https://vision.princeton.edu/projects/2010/SUN/, " + _TORCHVISION_HINT.format(cls="SUN397")),
    "cars": ("Cars", "root/stanford_cars/{devkit/cars_meta.mat, cars_test/*.jpg, cars_test_annos_withlabels.mat} "
             "(needs scipy)", "the Stanford Cars mirror on Kaggle (torchvision can no longer download it)"),
    "dtd": ("DTD", "root/dtd/dtd/{images/<class>/*.jpg, labels/test1.txt}",
            "https://www.robots.ox.ac.uk/~vgg/data/dtd/, " + _TORCHVISION_HINT.format(cls="DTD")),
    "caltech101": ("Caltech-101", "root/caltech101/101_ObjectCategories/<category>/image_NNNN.jpg (102 folders, "
                   "BACKGROUND_Google included)", "https://data.caltech.edu/records/mzrjq-6wc02, "
                   + _TORCHVISION_HINT.format(cls="Caltech101")),
    "fgvc_aircraft": ("Aircraft", "root/fgvc-aircraft-2013b/data/{images/*.jpg, variants.txt, "
                      "images_variant_test.txt}", "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/, "
                      + _TORCHVISION_HINT.format(cls="FGVCAircraft")),
    "imagenet1k": ("ImageNet", "root/val/<wnid>/*.JPEG (1000 WordNet-id folders), with root/meta.bin or "
                   "root/ILSVRC2012_devkit_t12.tar.gz (without them the folders alone are read)",
                   "https://image-net.org/download.php (ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz)"),
}
_KARPATHY = "https://github.com/mehdidc/retrieval_annotations/releases (CLIP_benchmark's Karpathy test splits)"
RETRIEVAL_SETS = {
    "mscoco_captions": ("MSCOCO 5k", "root/val2014/*.jpg and root/coco_test_karpathy.json (needs pycocotools)",
                        f"http://images.cocodataset.org/zips/val2014.zip and coco_test_karpathy.json from {_KARPATHY}"),
    "flickr30k": ("Flickr30k 1k", "root/*.jpg and root/flickr30k_test_karpathy.txt",
                  f"the Flickr30k images (flickr30k-images) and flickr30k_test_karpathy.txt from {_KARPATHY}"),
}
# CLIP_benchmark reports these with mean per-class recall, the others with top-1.
MEAN_PER_CLASS_SETS = ("pets", "flowers", "caltech101", "fgvc_aircraft")
_CLIP_BENCHMARK_NAMES = ("imagenet1k", "flowers", "caltech101")  # names from CLIP_benchmark's file, not torchvision's


@dataclass
class EvalDataset:
    """One evaluation set, as written in YAML under a callback's ``datasets:`` list.

    Args:
        name: CLIP_benchmark's dataset name (imagenet1k, cifar10, cifar100, food101, pets, flowers, sun397, cars, dtd,
            caltech101, fgvc_aircraft; mscoco_captions, flickr30k) to read that set from its usual layout, or any
            name with ``source`` set. Metrics are logged as ``<task>/<name>/...``.
        root: where the set lies (see the README for each layout). Relative paths here and in ``classnames``,
            ``templates`` and ``annotations`` are taken from the callback's ``root``.
        source: for your own sets: ``imagefolder`` (one folder per class, ``root/<split>`` when it exists),
            ``litdata`` (a prepared LitData directory with an ``image`` and an int ``label`` field, or caption
            fields for retrieval) or ``karpathy`` (images under ``root`` and Karpathy's ``dataset_*.json``).
        split: the split to read: ``test`` by default (ImageNet's ``val``; SUN397 and Caltech-101 have none).
        classnames: JSON file keyed by dataset name (CLIP_benchmark's format). Default: CLIP_benchmark's names.
        templates: JSON file keyed by dataset name, ``{c}`` marking the class name. Default: CLIP_benchmark's
            templates (from the ``clip_benchmark`` package); a name missing there gets ImageNet's, as in CLIP_benchmark.
        key: the key to read in those files when it is not ``name``.
        annotations: retrieval captions: COCO-format JSON (mscoco_captions), CLIP_benchmark's txt (flickr30k) or
            Karpathy's JSON (karpathy). Defaults: CLIP_benchmark's file names under ``root``.
        caption_keys: litdata retrieval: the text fields whose non-empty values are an image's captions.
        label_key: litdata classification: the int label field, an index into the class names.
        batch_size: images (and texts) per forward.
        num_workers: DataLoader workers decoding images.
        max_samples: evaluate a fixed, seeded random subset of this many images.
        train_split: LinearProbe: the split the probe is fitted on (e.g. ``train``).
        metric: the headline metric (progress bar, summary table). Default: mean_per_class_recall for pets,
            flowers, caltech101 and fgvc_aircraft, top1 for other classification sets, image_retrieval_recall@1.
    """

    name: str
    root: str
    source: Optional[Source] = None
    split: str = "test"
    classnames: Optional[str] = None
    templates: Optional[str] = None
    key: Optional[str] = None
    annotations: Optional[str] = None
    caption_keys: list[str] = field(default_factory=lambda: list(TEXT_FIELDS))
    label_key: str = LABEL
    batch_size: int = 64
    num_workers: int = 0
    max_samples: Optional[int] = None
    train_split: Optional[str] = None
    metric: Optional[str] = None


def as_config(d: EvalDataset | dict, root: Optional[str] = None) -> EvalDataset:
    """An EvalDataset from a dataclass (jsonargparse) or a plain dict, its relative paths taken from ``root``."""
    if isinstance(d, dict):
        d = EvalDataset(**d)
    if not isinstance(d, EvalDataset):
        raise TypeError(f"a dataset must be an EvalDataset or a dict, got {type(d).__name__}")
    if d.source is None and d.name not in CLASSIFICATION_SETS and d.name not in RETRIEVAL_SETS:
        raise ValueError(f"dataset {d.name!r}: not one of CLIP_benchmark's sets "
                         f"({', '.join([*CLASSIFICATION_SETS, *RETRIEVAL_SETS])}); set its source to imagefolder, "
                         "litdata or karpathy")
    if root:
        join = lambda p: p if p is None or os.path.isabs(p) else os.path.join(root, p)  # noqa: E731
        d = EvalDataset(**{**d.__dict__, "root": join(d.root), "classnames": join(d.classnames),
                           "templates": join(d.templates), "annotations": join(d.annotations)})
    return d


def headline_metric(cfg: EvalDataset, task: str) -> str:
    if task == "zeroshot_retrieval":
        return cfg.metric or "image_retrieval_recall@1"
    if cfg.metric not in (None, "top1", "top5", "mean_per_class_recall"):
        raise ValueError(f"dataset {cfg.name!r}: metric must be top1, top5 or mean_per_class_recall, "
                         f"got {cfg.metric!r}")
    return cfg.metric or ("mean_per_class_recall" if cfg.name in MEAN_PER_CLASS_SETS else "top1")


@dataclass
class ClassificationSet:
    name: str
    data: Any  # a Dataset of (PIL image, int label)
    indices: list[int]  # the samples to evaluate
    classnames: list[str]  # the name of label i
    templates: list[str]


@dataclass
class RetrievalSet:
    name: str
    data: Any  # a Dataset of (PIL image, list of captions)
    indices: list[int]
    captions: list[list[str]]  # captions[i]: the captions of data[i], read without loading the image


# ---------------------------------------------------------------- CLIP_benchmark's names and templates


def clip_benchmark_file(kind: str) -> dict[str, list[str]]:
    """CLIP_benchmark's ``en_classnames.json`` or ``en_zeroshot_classification_templates.json``, from the installed
    ``clip_benchmark`` package (only its data files are read, so ``pip install --no-deps clip_benchmark`` is enough)."""
    filename = {"classnames": "en_classnames.json", "templates": "en_zeroshot_classification_templates.json"}[kind]
    try:
        path = resources.files("clip_benchmark") / "datasets" / filename
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"CLIP_benchmark's {kind} come from the clip_benchmark package, which is not installed: "
            "`pip install 'rwkv-clip[eval]'` (or `pip install --no-deps clip_benchmark`), or give the dataset a "
            f"'{kind}' JSON file keyed by dataset name") from None
    return json.loads(path.read_text())


def read_keyed_json(path: str, what: str) -> dict[str, Any]:
    """A JSON object keyed by dataset name, read with errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} does not exist; give a JSON file keyed by dataset name")
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except ValueError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None
    if not isinstance(table, dict):
        raise ValueError(f"{what} file {path} must hold a JSON object keyed by dataset name")
    return table


def _entry(table: dict[str, Any], key: str, what: str, where: str) -> list[str]:
    if key not in table:
        raise KeyError(f"{what} in {where}: no entry {key!r} (it has {sorted(table)}); set the dataset's 'key'")
    value = table[key]
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{what} in {where}, entry {key!r}: expected a non-empty list of strings")
    return value


def _classnames_file(cfg: EvalDataset) -> list[str]:
    return _entry(read_keyed_json(cfg.classnames, "classnames"), cfg.key or cfg.name, "classnames", cfg.classnames)


def resolve_templates(cfg: EvalDataset) -> list[str]:
    key = cfg.key or cfg.name
    if cfg.templates:
        table, where = read_keyed_json(cfg.templates, "templates"), cfg.templates
    else:
        table, where = clip_benchmark_file("templates"), "CLIP_benchmark's templates"
    if key not in table and "imagenet1k" in table:
        print(f"[eval] {where} has no templates for {key!r}: using ImageNet's, as CLIP_benchmark does")
        key = "imagenet1k"
    return _entry(table, key, "templates", where)


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


def match_classnames(given: Sequence[str], own: Sequence[str], where: str, by_name: bool) -> list[str]:
    """The name of each label, given the names in a file and the data's own names of its labels.

    ``by_name`` (ImageFolder): every file name must be a folder name (ignoring case and ``_`` vs space), and each
    label gets the name of its folder. Otherwise the file is in label order; it is refused if one of its names is
    the data's name of another label, which is what a file sorted differently from the labels looks like.
    """
    given, own = list(given), list(own)
    if len(given) != len(own):
        raise ValueError(f"{where}: {len(given)} class names for {len(own)} classes in the data")
    mine = {_norm(n): i for i, n in enumerate(given)}
    if by_name:
        missing = [o for o in own if _norm(o) not in mine]
        if missing or len(mine) != len(given):
            extra = [g for g in given if _norm(g) not in {_norm(o) for o in own}]
            raise ValueError(
                f"{where}: the class names must be the folder names (in any order), as the folder decides the "
                f"label; folders without a name: {missing[:5]}, names without a folder: {extra[:5]}")
        return [given[mine[_norm(o)]] for o in own]
    theirs = {_norm(n): i for i, n in enumerate(own)}
    for i, g in enumerate(given):
        j = theirs.get(_norm(g))
        if j is not None and j != i:
            raise ValueError(f"{where}: name {i} is {g!r}, but the data calls label {j} {own[j]!r}: the file is not "
                             "in label order; list the names in the order of the dataset's labels")
    return given


# ---------------------------------------------------------------- readers


def _missing(cfg: EvalDataset, error: Exception) -> FileNotFoundError:
    title, layout, where = {**CLASSIFICATION_SETS, **RETRIEVAL_SETS}[cfg.name]
    return FileNotFoundError(f"dataset {cfg.name!r} ({title}) not found under root={cfg.root!r}: expected {layout}. "
                             f"Get it from {where}. ({type(error).__name__}: {error})")


def _require(module: str, cfg: EvalDataset) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"dataset {cfg.name!r}: torchvision reads it with {module}, which is not installed: "
                                  f"`pip install 'rwkv-clip[eval]'` (or `pip install {module}`)")


def _torchvision_set(cfg: EvalDataset, split: str) -> tuple[Any, list[str]]:
    """CLIP_benchmark's set ``cfg.name`` as its ``build_dataset`` makes it (download=False): (dataset, the names the
    dataset itself gives its labels)."""
    import torchvision.datasets as tv

    name, root = cfg.name, cfg.root
    if name in ("flowers", "cars"):
        _require("scipy", cfg)  # the .mat label files
    try:
        if name in ("cifar10", "cifar100"):
            ds = (tv.CIFAR10 if name == "cifar10" else tv.CIFAR100)(root, train=split == "train", download=False)
        elif name == "food101":
            ds = tv.Food101(root, split=split, download=False)
        elif name == "pets":
            ds = tv.OxfordIIITPet(root, split=split, target_types="category", download=False)
        elif name == "flowers":
            ds = tv.Flowers102(root, split=split, download=False)
        elif name == "sun397":
            ds = tv.SUN397(root, download=False)
        elif name == "cars":
            ds = tv.StanfordCars(root, split=split, download=False)
        elif name == "dtd":
            ds = tv.DTD(root, split=split, download=False)
        elif name == "fgvc_aircraft":
            ds = tv.FGVCAircraft(root, split=split, annotation_level="variant", download=False)
        elif name == "caltech101":
            # CLIP_benchmark keeps BACKGROUND_Google (102 classes, sorted folder names); torchvision's Caltech101
            # drops it, so the folders are read as they are.
            ds = tv.ImageFolder(os.path.join(root, "caltech101", "101_ObjectCategories"))
        else:  # imagenet1k; CLIP_benchmark's "test" split is ImageNet's val
            split = "val" if split == "test" else split
            has_meta = any(os.path.isfile(os.path.join(root, f)) for f in ("meta.bin", "ILSVRC2012_devkit_t12.tar.gz"))
            ds = tv.ImageNet(root, split=split) if has_meta else tv.ImageFolder(os.path.join(root, split))
            wnids = ds.wnids if has_meta else ds.classes
            if len(wnids) != 1000 or not all(re.fullmatch(r"n\d{8}", w) for w in wnids):
                raise FileNotFoundError(f"{len(wnids)} class folders, not the 1000 WordNet ids (n01440764, ...)")
            return ds, wnids
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise _missing(cfg, e) from None
    except ValueError as e:  # torchvision's verify_str_arg: a split the set does not have
        raise ValueError(f"dataset {cfg.name!r}: {e}") from None
    return ds, list(ds.classes)


class LitDataImages(torch.utils.data.Dataset):
    """A prepared LitData directory as (PIL image, label) or (PIL image, captions); its stored formats are checked
    before any sample is read, and it is opened lazily (in each loader worker)."""

    def __init__(self, directory: str, label_key: Optional[str] = None, caption_keys: Sequence[str] = ()):
        check_prepared_dir(directory)  # refuses pickled fields before anything is read
        with open(os.path.join(directory, "index.json")) as f:
            self.num_samples = sum(c["chunk_size"] for c in json.load(f)["chunks"])  # all ranks' samples
        self.directory, self.label_key, self.caption_keys = directory, label_key, list(caption_keys)
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

    def captions(self, sample: dict[str, Any]) -> list[str]:
        texts = [sample.get(k) for k in self.caption_keys]
        return list(dict.fromkeys(t for t in texts if isinstance(t, str) and t.strip()))  # a repeat counts once

    def __getitem__(self, i: int) -> tuple[Image.Image, Any]:
        s = self.sample(i)
        if IMAGE not in s:
            raise KeyError(f"{self.directory}: the samples have no {IMAGE!r} field (fields: {sorted(s)})")
        image = s[IMAGE]
        image = Image.open(io.BytesIO(image)) if isinstance(image, (bytes, bytearray)) else image
        if self.label_key is None:
            return image.convert("RGB"), self.captions(s)
        if self.label_key not in s:
            raise KeyError(f"{self.directory}: classification needs an int field {self.label_key!r} per sample "
                           f"(fields: {sorted(s)}); set the dataset's label_key")
        return image.convert("RGB"), int(s[self.label_key])


class CaptionedImages(torch.utils.data.Dataset):
    """Image files with their captions: (PIL image, captions)."""

    def __init__(self, paths: Sequence[str], captions: Sequence[list[str]]):
        self.paths, self.captions = list(paths), [list(c) for c in captions]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, list[str]]:
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB"), self.captions[i]


def _flickr_karpathy(root: str, ann_file: str) -> CaptionedImages:
    """CLIP_benchmark's ``flickr30k_<split>_karpathy.txt``: a header line, then ``<image>.jpg,<caption>`` lines."""
    captions: dict[str, list[str]] = {}
    with open(ann_file, encoding="utf-8") as f:
        f.readline()
        for line in f:
            line = line.strip()
            if line:
                image, caption = line.split(".jpg,", 1)
                captions.setdefault(image + ".jpg", []).append(caption)
    return CaptionedImages([os.path.join(root, p) for p in captions], list(captions.values()))


def _karpathy_json(root: str, ann_file: str, split: str) -> CaptionedImages:
    """Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json``: images[] with filepath, filename, sentences,
    split."""
    with open(ann_file, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{ann_file}: expected Karpathy's format {{'images': [{{filename, sentences, split}}]}}")
    images = [im for im in data["images"] if im.get("split") == split]
    if not images:
        raise ValueError(f"{ann_file}: no image with split {split!r} "
                         f"(splits present: {sorted({str(im.get('split')) for im in data['images']})})")
    return CaptionedImages([os.path.join(root, im.get("filepath", ""), im["filename"]) for im in images],
                           [[s["raw"] for s in im.get("sentences", [])] for im in images])


def _subset(n: int, max_samples: Optional[int], seed: int = 0) -> list[int]:
    if max_samples is None or max_samples >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:max_samples].tolist())


def _split_dir(cfg: EvalDataset, split: str) -> str:
    d = os.path.join(cfg.root, split)
    return d if split and os.path.isdir(d) else cfg.root


def load_classification(cfg: EvalDataset, split: Optional[str] = None, prompts: bool = True) -> ClassificationSet:
    """Read a classification set: its data, its class names in label order and (with ``prompts``) its templates."""
    split = split or cfg.split
    where = f"dataset {cfg.name!r}"
    if cfg.source == "imagefolder":
        from torchvision.datasets import ImageFolder

        folder = _split_dir(cfg, split)
        try:
            data = ImageFolder(folder)
        except (FileNotFoundError, OSError) as e:
            raise FileNotFoundError(f"{where}: no class folders with images in {folder} ({e})") from None
        own = data.classes
        if cfg.classnames:
            names = match_classnames(_classnames_file(cfg), own, f"{where}, {cfg.classnames}", by_name=True)
        elif any(re.fullmatch(r"n\d{8}", f) for f in own):
            raise ValueError(f"{where}: the folders under {folder} are WordNet ids; name the set imagenet1k to read "
                             "it with CLIP_benchmark's names, or give 'classnames'")
        else:
            names = [f.replace("_", " ") for f in own]
    elif cfg.source == "litdata":
        data = LitDataImages(_split_dir(cfg, split), label_key=cfg.label_key)
        if cfg.classnames:
            names = _classnames_file(cfg)  # the label field is an index into this list
        elif prompts:
            raise ValueError(f"{where}: a LitData set's labels are indices into a class-names list; give "
                             "'classnames', a JSON file keyed by dataset name")
        else:
            names = []  # the linear probe needs only the labels
    elif cfg.source is None and cfg.name in CLASSIFICATION_SETS:
        data, own = _torchvision_set(cfg, split)
        if cfg.classnames:
            names = match_classnames(_classnames_file(cfg), own, f"{where}, {cfg.classnames}", by_name=False)
        elif cfg.name in _CLIP_BENCHMARK_NAMES:
            names = match_classnames(clip_benchmark_file("classnames")[cfg.name], own,
                                     f"{where}, CLIP_benchmark's class names", by_name=False)
        elif cfg.name == "food101":  # CLIP_benchmark's renaming of torchvision's names
            names = [c.replace("_", " ") for c in own]
        elif cfg.name == "sun397":
            names = [c.replace("_", " ").replace("/", " ") for c in own]
        else:
            names = list(own)
    else:
        raise ValueError(f"{where}: {cfg.source or cfg.name} is a retrieval set, not a classification set")
    templates = resolve_templates(cfg) if prompts else []
    return ClassificationSet(cfg.name, data, _subset(len(data), cfg.max_samples), names, templates)


def load_retrieval(cfg: EvalDataset) -> RetrievalSet:
    """Read a retrieval set: its images and every image's captions."""
    split = cfg.split
    if cfg.source == "litdata":
        data = LitDataImages(_split_dir(cfg, split), caption_keys=cfg.caption_keys)
        captions = [data.captions(data.sample(i)) for i in range(len(data))]
    elif cfg.source == "karpathy" or (cfg.source is None and cfg.name in RETRIEVAL_SETS):
        default = {"mscoco_captions": f"coco_{split}_karpathy.json", "flickr30k": f"flickr30k_{split}_karpathy.txt"}
        ann = cfg.annotations or (os.path.join(cfg.root, default[cfg.name]) if cfg.source is None else None)
        try:
            if not ann or not os.path.isfile(ann):
                raise FileNotFoundError(f"annotations file {ann!r} does not exist")
            if cfg.source == "karpathy":
                data = _karpathy_json(cfg.root, ann, split)
            elif cfg.name == "flickr30k":
                data = _flickr_karpathy(cfg.root, ann)
            else:  # CLIP_benchmark reads the 5k Karpathy test images from val2014 with torchvision's CocoCaptions
                from torchvision.datasets import CocoCaptions

                _require("pycocotools", cfg)

                data = CocoCaptions(os.path.join(cfg.root, "train2014" if split == "train" else "val2014"), ann)
        except FileNotFoundError as e:
            if cfg.source == "karpathy":
                raise FileNotFoundError(f"dataset {cfg.name!r}: source karpathy needs 'annotations', Karpathy's "
                                        f"dataset_*.json ({e})") from None
            raise _missing(cfg, e) from None
        if isinstance(data, CaptionedImages):
            captions = data.captions
            if data.paths and not os.path.isfile(data.paths[0]):
                raise _missing(cfg, FileNotFoundError(f"image {data.paths[0]} not found"))
        else:
            coco = data.coco
            captions = [[a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=i))] for i in data.ids]
    else:
        raise ValueError(f"dataset {cfg.name!r}: {cfg.source or cfg.name} has no captions; retrieval reads "
                         f"{', '.join(RETRIEVAL_SETS)}, or a source karpathy or litdata")
    if not any(captions):
        raise ValueError(f"dataset {cfg.name!r}: no image with a caption under {cfg.root} (split {split!r})")
    return RetrievalSet(cfg.name, data, _subset(len(data), cfg.max_samples), captions)
