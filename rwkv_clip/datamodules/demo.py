"""The built-in demo: a seeded synthetic image-text dataset generated on first use, and its DataModule.

Images are coloured shapes (circle, square, triangle, ...) of several sizes and positions on varied backgrounds
(plain, gradient, noise). Every image carries three texts of different style and noise, like RWKV-CLIP's data:

- ``text``: a terse, noisy "raw alt-text" (typos, missing words, camera file names; sometimes empty),
- ``synthetic_caption``: a templated caption, "a red circle." or "a red circle on a gray background.",
- ``generated_caption``: a richer sentence, "A large red circle sits near the top of a noisy gray picture."

Layout of ``root`` (default ``data/demo``)::

    train/ val/ test/        LitData; test (like train and val) has an int "label" = index into classnames
    tokenizer.json           byte-level BPE trained on the train captions
    classnames.json          {"demo": ["red circle", ...]}          (CLIP_benchmark format)
    templates.json           {"demo": ["a photo of a {c}.", ...]}
    manifest.json            generation parameters: a change regenerates the data

The splits are written with ``prepare``'s own writer (:func:`rwkv_clip.datamodules.prepare.write_samples`), so the
demo is plain prepared data. Generation is deterministic (same parameters -> same bytes) and takes a few seconds.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import math
import os
import shutil
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from rwkv_clip.datamodules.image_text import ImageTextDataModule
from rwkv_clip.datamodules.prepare import write_samples
from rwkv_clip.tokenizer import TEXT_FIELDS, Tokenizer

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3

# name -> nominal RGB; each sample jitters it a little so a colour is a region, not a point.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (35, 70, 225), "yellow": (240, 215, 20),
    "purple": (140, 40, 190), "orange": (250, 130, 10), "pink": (245, 110, 190), "cyan": (20, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "heart")
# Low-saturation backgrounds so that the shape's colour stays the salient one.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128), "white": (235, 235, 232), "black": (25, 25, 28), "beige": (215, 200, 170),
    "dark gray": (70, 72, 75), "light gray": (190, 190, 192),
}
BG_STYLES = ("plain", "gradient", "noisy")
SIZES = {"small": (0.19, 0.25), "medium": (0.26, 0.32), "large": (0.33, 0.41)}  # radius / image side
POSITIONS = ("in the middle", "near the top", "near the bottom")  # no left/right: train augmentation flips

TEMPLATES = ["a photo of a {c}.", "a {c}.", "a picture of a {c}.", "an image of a {c} shape.", "a drawing of a {c}.",
             "a {c} on a background."]

DEFAULTS: dict[str, Any] = dict(
    num_train=8000, num_val=256, num_test_per_class=12, image_size=64,
    shapes=["circle", "square", "triangle", "star", "cross"],
    colours=["red", "green", "blue", "yellow"],
    vocab_size=512, seed=0,
)

_RAW_JUNK = ["IMG_{n:04d} jpg", "DSC{n:05d}", "stock photo", "free download", "hd wallpaper", "clipart", "#shapes",
             "vector art", "image {n}", "untitled", "copy of scan {n}", "pic", "thumbnail", "2019 {n}"]
_RICH = [
    "A {size} {colour} {shape} sits {pos} of {a_bg} {bgdesc} picture.",
    "This image shows {a_colour} {colour} {shape}, {size} and drawn {pos}, over {a_bg} {bgdesc} background.",
    "There is a single {size} {shape} in {colour}, placed {pos}; the background is {bgdesc}.",
    "On {a_bg} {bgdesc} backdrop, {a_colour} {colour} {shape} of {size} size appears {pos}.",
    "A simple graphic: one {colour} {shape} {pos} against {a_bg} {bgdesc} background.",
]


# ---------------------------------------------------------------- drawing
def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    def rot(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if shape == "square":
        a = r * 0.85
        return rot([(-a, -a), (a, -a), (a, a), (-a, a)])
    if shape == "diamond":  # taller than wide, so it is not just a rotated square
        return rot([(0, -r), (r * 0.62, 0), (0, r), (-r * 0.62, 0)])
    if shape == "triangle":
        return rot([(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "star":
        return rot([((r if i % 2 == 0 else r * 0.42) * math.cos(-math.pi / 2 + i * math.pi / 5),
                     (r if i % 2 == 0 else r * 0.42) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)])
    if shape == "cross":
        a, b = r, r * 0.33
        return rot([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
                    (-a, -b), (-b, -b)])
    if shape == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17, y * r / 17))
        return rot(pts)
    return None


def _background(rng: np.random.Generator, size: int, style: str, base: tuple[int, int, int]) -> np.ndarray:
    base_arr = np.array(base, dtype=np.float32)
    if style == "plain":
        img = np.broadcast_to(base_arr, (size, size, 3)).copy()
        img += rng.normal(0, 3, (size, size, 3))
    elif style == "gradient":
        other = np.clip(base_arr + rng.uniform(-60, 60) + rng.normal(0, 8, 3), 0, 255)
        t = np.linspace(0, 1, size, dtype=np.float32)
        theta = rng.uniform(0, 2 * math.pi)
        ramp = (np.cos(theta) * t[None, :] + np.sin(theta) * t[:, None])
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
        img = base_arr * (1 - ramp[..., None]) + other * ramp[..., None]
    else:  # noisy: blocky value noise plus pixel noise
        cells = int(rng.integers(4, 12))
        coarse = rng.normal(0, 25, (cells, cells, 1)).astype(np.float32)
        coarse = np.array(Image.fromarray(coarse[..., 0]).resize((size, size), Image.BILINEAR))[..., None]
        img = base_arr + coarse + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def render(rng: np.random.Generator, image_size: int, shape: str, colour: str) -> tuple[Image.Image, dict[str, str]]:
    """One image of ``colour`` ``shape``; returns the image and the attributes used in its captions."""
    bg_name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    style = BG_STYLES[int(rng.integers(len(BG_STYLES)))]
    size_name = list(SIZES)[int(rng.integers(len(SIZES)))]
    pos = POSITIONS[int(rng.integers(len(POSITIONS)))]
    scale = 3  # draw large, then downsample: anti-aliased edges
    s = image_size * scale
    img = Image.fromarray(_background(rng, image_size, style, BACKGROUNDS[bg_name])).resize((s, s), Image.NEAREST)
    mask = Image.new("L", (s, s), 0)  # draw the shape as a mask, then paint it: rings keep the real background
    draw = ImageDraw.Draw(mask)
    r = rng.uniform(*SIZES[size_name]) * s
    margin = r * 1.05
    cx = rng.uniform(margin, s - margin)
    band = {"in the middle": (0.4, 0.6), "near the top": (0.0, 0.4), "near the bottom": (0.6, 1.0)}[pos]
    cy = margin + (s - 2 * margin) * rng.uniform(*band)
    rgb = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in COLOURS[colour])
    angle = rng.uniform(-0.35, 0.35)  # upright-ish: a pointing-down triangle would read as another shape
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            w = r * 0.55
            draw.ellipse([cx - w, cy - w, cx + w, cy + w], fill=0)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=255)
    img.paste(rgb, (0, 0, s, s), mask)
    img = img.resize((image_size, image_size), Image.LANCZOS)
    bgdesc = {"plain": f"plain {bg_name}", "gradient": f"{bg_name} gradient", "noisy": f"noisy {bg_name}"}[style]
    return img, {"shape": shape, "colour": colour, "size": size_name, "pos": pos, "bg": bg_name, "bgdesc": bgdesc}


# ---------------------------------------------------------------- texts
def _typo(rng: np.random.Generator, word: str) -> str:
    if len(word) < 3:
        return word
    i = int(rng.integers(1, len(word)))
    op = int(rng.integers(3))
    if op == 0:
        return word[:i] + word[i + 1:]  # drop a letter
    if op == 1 and i < len(word) - 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]  # swap two
    return word[:i] + word[i - 1] + word[i:]  # double a letter


def raw_text(rng: np.random.Generator, a: dict[str, str]) -> str:
    """Terse, noisy alt-text: word order shuffled, words dropped or misspelt, junk tokens; ~8% empty."""
    if rng.random() < 0.08:
        return ""
    words = []
    if rng.random() < 0.85:
        words.append(a["colour"])
    if rng.random() < 0.85:
        words.append(a["shape"])
    if rng.random() < 0.3:
        words.append(a["bg"])
    if rng.random() < 0.2:
        words.append(a["size"])
    words = [_typo(rng, w) if rng.random() < 0.15 else w for w in words]
    if rng.random() < 0.4:
        rng.shuffle(words)
    for _ in range(int(rng.integers(0, 3))):
        junk = _RAW_JUNK[int(rng.integers(len(_RAW_JUNK)))].format(n=int(rng.integers(10000)))
        words.insert(int(rng.integers(len(words) + 1)), junk)
    if not words:
        words = [_RAW_JUNK[0].format(n=int(rng.integers(10000)))]
    text = " ".join(words)
    return text.upper() if rng.random() < 0.1 else text


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def templated_caption(rng: np.random.Generator, a: dict[str, str]) -> str:
    """"a red circle." or "a red circle on a gray background." (half each: the object is what captions name)."""
    where = f" on {_a(a['bg'])} {a['bg']} background" if rng.random() < 0.5 else ""
    return f"{_a(a['colour'])} {a['colour']} {a['shape']}{where}."


def rich_caption(rng: np.random.Generator, a: dict[str, str]) -> str:
    return _RICH[int(rng.integers(len(_RICH)))].format(a_colour=_a(a["colour"]), a_bg=_a(a["bgdesc"]), **a)


# ---------------------------------------------------------------- generation
def _make_split(rng: np.random.Generator, classes: list[tuple[str, str]], labels: list[int], image_size: int,
                split: str) -> list[dict[str, Any]]:
    out = []
    for i, label in enumerate(labels):
        colour, shape = classes[label]
        img, attrs = render(rng, image_size, shape, colour)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        out.append({"key": f"{split}-{i:06d}", "image": buf.getvalue(), "text": raw_text(rng, attrs),
                    "synthetic_caption": templated_caption(rng, attrs), "generated_caption": rich_caption(rng, attrs),
                    "tags": ", ".join([attrs["colour"], attrs["shape"], attrs["bg"]]), "label": int(label)})
    return out


def _params(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown demo data parameter(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **overrides}
    p["shapes"], p["colours"] = list(p["shapes"]), list(p["colours"])
    for name, allowed in (("shapes", SHAPES), ("colours", list(COLOURS))):
        bad = [v for v in p[name] if v not in allowed]
        if bad or not p[name] or len(set(p[name])) != len(p[name]):
            raise ValueError(f"demo {name} must be distinct names from {list(allowed)}, got {p[name]}")
    if len(p["shapes"]) * len(p["colours"]) < 2:
        raise ValueError("the demo needs at least 2 classes (shapes x colours)")
    for name in ("num_train", "num_test_per_class", "image_size"):
        if int(p[name]) < 1:
            raise ValueError(f"demo {name} must be positive, got {p[name]}")
    if int(p["image_size"]) < 16:
        raise ValueError(f"demo image_size must be >= 16, got {p['image_size']}")
    p["version"] = GENERATOR_VERSION
    return p


def classnames(shapes: list[str], colours: list[str]) -> list[str]:
    """Class i of the demo: colour-major ``f"{colour} {shape}"``."""
    return [f"{c} {s}" for c in colours for s in shapes]


_OUTPUTS = ("train", "val", "test", "tokenizer.json", "classnames.json", "templates.json", "manifest.json")


def _read_manifest(root: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(root, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    complete = all(os.path.exists(os.path.join(root, o)) for o in _OUTPUTS) and all(
        os.path.isfile(os.path.join(root, s, "index.json")) for s in ("train", "val", "test"))
    return manifest if complete else None


def ensure_demo_data(root: str = "data/demo", **params: Any) -> str:
    """Generate the demo dataset into ``root`` unless it is already there; returns ``root``.

    Without parameters an existing complete demo dataset is kept whatever its parameters (so the eval callbacks
    can call ``ensure_demo_data(root)`` next to a tuned DemoDataModule). With parameters (``num_train``,
    ``num_val``, ``num_test_per_class``, ``image_size``, ``shapes``, ``colours``, ``vocab_size``, ``seed``), data
    generated with other values is replaced. Safe to call from several processes (file lock).
    """
    wanted = _params(params)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # DDP ranks / eval callbacks may race here; one generates
        manifest = _read_manifest(root)
        if manifest is not None and (not params or manifest.get("params") == wanted):
            return root
        if manifest is not None:
            log.warning("demo data in %s was generated with other parameters; regenerating", root)
        _generate(root, wanted)
    return root


def _generate(root: str, p: dict[str, Any]) -> None:
    import time

    t0 = time.time()
    log.info("generating the demo dataset in %s ...", root)
    tmp = os.path.join(root, f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    classes = [(c, s) for c in p["colours"] for s in p["shapes"]]
    n_cls = len(classes)
    seeds = np.random.SeedSequence([int(p["seed"]), 20240613]).spawn(3)  # one independent stream per split
    size = int(p["image_size"])
    splits = {}
    for name, seq, labels in (
        ("train", seeds[0], None),
        ("val", seeds[1], None),
        ("test", seeds[2], [k for k in range(n_cls) for _ in range(int(p["num_test_per_class"]))]),
    ):
        rng = np.random.default_rng(seq)
        if labels is None:
            n = int(p["num_train"] if name == "train" else p["num_val"])
            labels = [int(v) for v in rng.integers(0, n_cls, n)]
        if not labels:
            labels = [0]
        splits[name] = _make_split(rng, classes, labels, size, name)
        # prepare's own writer, in this process: the same bytes for the same samples, index.json written last.
        write_samples(splits[name], os.path.join(tmp, name), chunk_bytes="4MB")
    texts = [s[f] for s in splits["train"] for f in TEXT_FIELDS if s[f]]
    Tokenizer.train(texts, vocab_size=int(p["vocab_size"]), min_frequency=2).save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "classnames.json"), "w") as f:
        json.dump({"demo": classnames(p["shapes"], p["colours"])}, f, indent=1)
    with open(os.path.join(tmp, "templates.json"), "w") as f:
        json.dump({"demo": TEMPLATES}, f, indent=1)
    # Swap in: remove only our own outputs, move the new ones, write the manifest last (it marks completeness).
    for name in _OUTPUTS:
        target = os.path.join(root, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
    for name in _OUTPUTS[:-1]:
        os.replace(os.path.join(tmp, name), os.path.join(root, name))
    shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"params": p, "counts": {k: len(v) for k, v in splits.items()}, "num_classes": n_cls}, f, indent=1)
    log.info("demo dataset ready in %s (%.1f s): %s", root, time.time() - t0, {k: len(v) for k, v in splits.items()})


class DemoDataModule(ImageTextDataModule):
    """ImageTextDataModule over ``root/train``, ``root/val`` and ``root/tokenizer.json``, which ``prepare_data``
    generates on first use (see :func:`ensure_demo_data`; a change of a generation argument regenerates them).

    Generation args: ``num_train``, ``num_val``, ``num_test_per_class``, ``data_image_size`` (the stored images'
    side), ``shapes``, ``colours``, ``vocab_size`` (the BPE is trained to at most this many tokens, and the text
    tower gets this vocabulary through main.py's links) and ``data_seed``. The held-out ``root/test`` split, with
    ``classnames.json`` and ``templates.json``, is an ordinary evaluation set for the zero-shot callbacks
    (``source: litdata``). Every other argument is ImageTextDataModule's.
    """

    def __init__(
        self,
        root: str = "data/demo",
        num_train: int = DEFAULTS["num_train"],
        num_val: int = DEFAULTS["num_val"],
        num_test_per_class: int = DEFAULTS["num_test_per_class"],
        data_image_size: int = DEFAULTS["image_size"],
        shapes: list[str] = DEFAULTS["shapes"],
        colours: list[str] = DEFAULTS["colours"],
        vocab_size: int = DEFAULTS["vocab_size"],
        data_seed: int = DEFAULTS["seed"],
        image_size: int = 32,
        context_length: int = 32,
        batch_size: int = 128,
        num_workers: int = 1,
        **kwargs: Any,
    ) -> None:
        self.root = root
        self.gen_params = _params(dict(num_train=num_train, num_val=num_val, num_test_per_class=num_test_per_class,
                                       image_size=data_image_size, shapes=shapes, colours=colours,
                                       vocab_size=vocab_size, seed=data_seed))
        self.gen_params.pop("version")
        super().__init__(
            train_dir=os.path.join(root, "train"), tokenizer=os.path.join(root, "tokenizer.json"),
            val_dir=os.path.join(root, "val") if num_val > 0 else None, context_length=context_length,
            image_size=image_size, batch_size=batch_size, num_workers=num_workers, **kwargs)
        self.test_dir = os.path.join(root, "test")

    def prepare_data(self) -> None:
        ensure_demo_data(self.root, **self.gen_params)

    @property
    def vocab_size(self) -> int:
        # The generated tokenizer has at most this many tokens; known before it exists, so the model can be built.
        return int(self.gen_params["vocab_size"])

    @property
    def classnames(self) -> list[str]:
        return classnames(self.gen_params["shapes"], self.gen_params["colours"])

    @property
    def templates(self) -> list[str]:
        return list(TEMPLATES)
