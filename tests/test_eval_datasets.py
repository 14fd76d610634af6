"""The evaluation sets: tiny copies of each layout, read back with the right counts, labels and class names.

Each image is as wide as 8 + the index of the class it was written under (``eval_layouts``), so every label that
comes back is checked against the class it really belongs to. Where the ``clip_benchmark`` package is importable,
its own ``build_dataset`` reads the same folders and must agree sample by sample.
"""

import importlib.util
import json
from pathlib import Path

import pytest

import eval_layouts as L
from rwkv_clip.callbacks import EvalDataset, ZeroShotClassification, load_classification, load_retrieval
from rwkv_clip.callbacks.datasets import as_config, match_classnames

HAS_CB = importlib.util.find_spec("clip_benchmark") is not None
HAS_SCIPY = importlib.util.find_spec("scipy") is not None
HAS_COCO = importlib.util.find_spec("pycocotools") is not None
needs_cb = pytest.mark.skipif(not HAS_CB, reason="clip_benchmark is not installed (pip install 'rwkv-clip[eval]')")
needs_scipy = pytest.mark.skipif(not HAS_SCIPY, reason="scipy (torchvision reads Flowers/Cars .mat files with it)")
needs_coco = pytest.mark.skipif(not HAS_COCO, reason="pycocotools (torchvision's CocoCaptions needs it)")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def templates(tmp_path):
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"imagenet1k": ["a photo of a {c}."]}))
    return str(path)


@pytest.fixture(autouse=True)
def _checksums(monkeypatch):
    L.patch_torchvision_checksums(monkeypatch)


def _check(cs, expected_names, n):
    """Counts, and each sample's label against the class its image was written for."""
    assert len(cs.indices) == n == len(cs.data)
    for i in cs.indices:
        img, label = cs.data[i]
        assert L.marker(img) == label, (i, label)
    if expected_names is not None:
        assert cs.classnames == expected_names


@pytest.mark.parametrize("name", ["food101", "pets", "sun397", "dtd", "fgvc_aircraft"])
def test_torchvision_layouts(name, tmp_path, templates):
    expected = getattr(L, f"make_{name}")(tmp_path)
    cs = load_classification(EvalDataset(name=name, root=str(tmp_path), templates=templates))
    _check(cs, expected["classnames"], expected["n"])
    assert cs.templates == ["a photo of a {c}."]  # the imagenet1k fallback of the templates file


@needs_scipy
@pytest.mark.parametrize("name", ["cars", "flowers"])
def test_mat_file_layouts(name, tmp_path, templates):
    expected = getattr(L, f"make_{name}")(tmp_path)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"flowers": [f"flower {i}" for i in range(102)]}))
    cs = load_classification(EvalDataset(name=name, root=str(tmp_path), templates=templates,
                                         classnames=str(names) if name == "flowers" else None))
    _check(cs, expected.get("classnames"), expected["n"])
    if name == "flowers":
        assert sorted({cs.data[i][1] for i in cs.indices}) == [0, 1, 5] and len(cs.classnames) == 102


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar(name, tmp_path, templates):
    expected = L.make_cifar(tmp_path, name)
    cs = load_classification(EvalDataset(name=name, root=str(tmp_path), templates=templates))
    assert cs.classnames == expected["classnames"] and len(cs.indices) == expected["n"]
    for i, label in enumerate(expected["labels"]):
        img, got = cs.data[i]
        assert got == label and img.getpixel((0, 0))[0] == label % 256
    if name == "cifar100":
        assert "aquarium_fish" in cs.classnames  # CLIP_benchmark takes torchvision's names as they are
    train = load_classification(EvalDataset(name=name, root=str(tmp_path), templates=templates), split="train")
    assert len(train.indices) == (5 if name == "cifar100" else 25)


def test_caltech101_keeps_background_and_checks_the_order(tmp_path, templates):
    folders = [f"{k:03d}_folder" for k in range(101)] + ["BACKGROUND_Google"]
    expected = L.make_caltech101(tmp_path, folders)
    names = [f"name {k}" for k in range(102)]
    file = tmp_path / "names.json"
    file.write_text(json.dumps({"caltech101": names}))
    cs = load_classification(EvalDataset(name="caltech101", root=str(tmp_path), templates=templates,
                                         classnames=str(file)))
    _check(cs, names, expected["n"])
    assert cs.data.classes[0] == "000_folder" and cs.data.classes[-1] == "BACKGROUND_Google"  # 102 classes, sorted
    # A file whose names are the folder names in another order is refused, not paired by position.
    shuffled = sorted(cs.data.classes, key=str.lower, reverse=True)
    file.write_text(json.dumps({"caltech101": shuffled}))
    with pytest.raises(ValueError, match="not in label order"):
        load_classification(EvalDataset(name="caltech101", root=str(tmp_path), templates=templates,
                                        classnames=str(file)))


def test_imagenet_with_meta_and_as_bare_folders(tmp_path, templates):
    expected = L.make_imagenet1k(tmp_path)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"imagenet1k": [f"thing {i}" for i in range(1000)]}))
    cfg = EvalDataset(name="imagenet1k", root=str(tmp_path), templates=templates, classnames=str(names))
    cs = load_classification(cfg)
    assert len(cs.indices) == 1000 and cs.classnames[7] == "thing 7"
    assert [cs.data[i][1] for i in range(3)] == [0, 1, 2] and L.marker(cs.data[2][0]) == 2
    (tmp_path / "meta.bin").unlink()  # CLIP_benchmark's "imagenet1k-unverified": the folders alone
    bare = load_classification(cfg)
    assert len(bare.indices) == 1000 and bare.data[2][1] == 2
    (tmp_path / "val" / expected["wnids"][0] / "ILSVRC2012_val_00000000.JPEG").rename(tmp_path / "x.JPEG")
    with pytest.raises(FileNotFoundError, match="ImageNet.*1000 WordNet-id folders"):
        load_classification(cfg)


def test_imagefolder_matches_names_to_folders(tmp_path, templates):
    """The filer's 12.2%: names in label order, folders sorted alphabetically. Names now follow the folders."""
    for k, c in enumerate(["zebra", "apple_tree", "Mango"]):
        for j in range(2):
            L._save(L.image(k), tmp_path / "test" / c / f"{j}.png")
    file = tmp_path / "names.json"
    file.write_text(json.dumps({"fruit": ["zebra", "apple tree", "mango"]}))  # not the sorted folder order
    cfg = dict(name="fruit", source="imagefolder", root=str(tmp_path), templates=templates)
    cs = load_classification(EvalDataset(**cfg, classnames=str(file)))
    assert cs.data.classes == ["Mango", "apple_tree", "zebra"]
    assert cs.classnames == ["mango", "apple tree", "zebra"]  # label i gets the name of folder i
    for i in cs.indices:
        img, label = cs.data[i]
        assert ["zebra", "apple tree", "mango"][L.marker(img)] == cs.classnames[label]
    file.write_text(json.dumps({"fruit": ["zebra", "apple", "mango"]}))
    with pytest.raises(ValueError, match=r"folders without a name: \['apple_tree'\].*names without a folder: "
                                         r"\['apple'\]"):
        load_classification(EvalDataset(**cfg, classnames=str(file)))
    assert load_classification(EvalDataset(**cfg)).classnames == ["Mango", "apple tree", "zebra"]  # folder names


def test_match_classnames_rules():
    assert match_classnames(["b", "a"], ["a", "b"], "x", by_name=True) == ["a", "b"]
    assert match_classnames(["cat", "dog"], ["n1", "n2"], "x", by_name=False) == ["cat", "dog"]  # ids: by position
    with pytest.raises(ValueError, match="label 1"):
        match_classnames(["Dog", "cat"], ["cat", "dog"], "x", by_name=False)
    with pytest.raises(ValueError, match="3 class names for 2 classes"):
        match_classnames(["a", "b", "c"], ["a", "b"], "x", by_name=False)


def test_litdata_sets(tmp_path, templates):
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(tmp_path / "test"), chunk_bytes="1MB")
    for i in range(5):
        writer.add_item(i, {"image": _jpeg(i % 3), "text": f"text {i}", "synthetic_caption": f"text {i}" if i else "",
                            "generated_caption": "", "label": i % 3})
    writer.done()
    writer._merge_no_wait()
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"shapes": ["zero", "one", "two"]}))
    cs = load_classification(EvalDataset(name="shapes", source="litdata", root=str(tmp_path), classnames=str(names),
                                         templates=templates))
    _check(cs, ["zero", "one", "two"], 5)
    rs = load_retrieval(EvalDataset(name="shapes", source="litdata", root=str(tmp_path)))
    assert rs.captions[0] == ["text 0"] and rs.captions[1] == ["text 1"]  # empty and repeated texts count once
    with pytest.raises(ValueError, match="classnames"):
        load_classification(EvalDataset(name="shapes", source="litdata", root=str(tmp_path), templates=templates))
    assert load_classification(EvalDataset(name="shapes", source="litdata", root=str(tmp_path)),
                               prompts=False).classnames == []  # the linear probe needs only labels


def test_litdata_with_pickled_fields_is_refused_before_reading(tmp_path):
    from litdata.streaming.writer import BinaryWriter

    from rwkv_clip.schema import UnsafeDatasetError

    writer = BinaryWriter(str(tmp_path / "test"), chunk_bytes="1MB")
    writer.add_item(0, {"image": _jpeg(0), "label": 0, "extra": {"a": object.__name__}})  # a dict: pickled
    writer.done()
    writer._merge_no_wait()
    with pytest.raises(UnsafeDatasetError, match="pickle"):
        load_retrieval(EvalDataset(name="x", source="litdata", root=str(tmp_path)))


def _jpeg(k):
    import io

    buf = io.BytesIO()
    L.image(k).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("name", [pytest.param("mscoco_captions", marks=needs_coco), "flickr30k"])
def test_retrieval_layouts(name, tmp_path):
    expected = getattr(L, f"make_{name}")(tmp_path)
    rs = load_retrieval(EvalDataset(name=name, root=str(tmp_path)))
    assert len(rs.indices) == expected["n"] and rs.captions == expected["captions"]
    for i in rs.indices:
        img, caps = rs.data[i]
        assert L.marker(img) == i and caps == expected["captions"][i]


def test_karpathy_json(tmp_path):
    L.make_flickr30k(tmp_path)
    images = [{"filename": f"{1000 + i}.jpg", "split": "test" if i != 1 else "train",
               "sentences": [{"raw": c} for c in caps]} for i, caps in enumerate(L.COCO_CAPTIONS)]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    rs = load_retrieval(EvalDataset(name="f", source="karpathy", root=str(tmp_path),
                                    annotations=str(tmp_path / "dataset_flickr30k.json")))
    assert rs.captions == [L.COCO_CAPTIONS[0], L.COCO_CAPTIONS[2]] and L.marker(rs.data[1][0]) == 2
    with pytest.raises(ValueError, match="splits present"):
        load_retrieval(EvalDataset(name="f", source="karpathy", root=str(tmp_path), split="val",
                                   annotations=str(tmp_path / "dataset_flickr30k.json")))


@pytest.mark.parametrize("name", ["cifar10", "food101", "pets", "flowers", "sun397", "cars", "dtd", "caltech101",
                                  "fgvc_aircraft", "imagenet1k", "mscoco_captions", "flickr30k"])
def test_missing_set_names_the_layout_and_where_to_get_it(name, tmp_path):
    cfg = EvalDataset(name=name, root=str(tmp_path / "nowhere"), templates="unused.json")
    load = load_retrieval if name in ("mscoco_captions", "flickr30k") else load_classification
    if name in ("flowers", "cars") and not HAS_SCIPY:
        with pytest.raises(ModuleNotFoundError, match="scipy"):
            load(cfg)
        return
    with pytest.raises(FileNotFoundError, match=r"not found under root=.*expected .*Get it from"):
        load(cfg)


def test_config_errors_and_relative_paths(tmp_path):
    with pytest.raises(ValueError, match="set its source"):
        as_config({"name": "my_set", "root": "x"})
    cfg = as_config({"name": "cifar10", "root": "cifar", "templates": "/abs/t.json"}, root="/data")
    assert cfg.root == "/data/cifar" and cfg.templates == "/abs/t.json"
    with pytest.raises(ValueError, match="empty"):
        ZeroShotClassification(datasets=[])
    with pytest.raises(ValueError, match="metric must be"):
        ZeroShotClassification(datasets=[{"name": "cifar10", "root": "x", "metric": "top3"}])
    with pytest.raises(ValueError, match="retrieval set"):
        load_classification(EvalDataset(name="flickr30k", root=str(tmp_path)))


# ---------------------------------------------------------------- CLIP_benchmark's own reading of the same folders


@needs_cb
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "food101", "pets", "sun397", "dtd", "fgvc_aircraft",
                                  pytest.param("flowers", marks=needs_scipy), pytest.param("cars", marks=needs_scipy),
                                  "caltech101", "imagenet1k"])
def test_same_samples_labels_and_names_as_clip_benchmark(name, tmp_path):
    from clip_benchmark.datasets.builder import build_dataset

    if name in ("cifar10", "cifar100"):
        L.make_cifar(tmp_path, name)
    elif name == "caltech101":
        L.make_caltech101(tmp_path, [f"{k:03d}_folder" for k in range(101)] + ["BACKGROUND_Google"])
    else:
        getattr(L, f"make_{name}")(tmp_path)
    ref = build_dataset(name, root=str(tmp_path), split="test", download=False)
    ours = load_classification(EvalDataset(name=name, root=str(tmp_path)))
    assert ours.classnames == list(ref.classes) and ours.templates == ref.templates
    assert len(ours.indices) == len(ref)
    for i in ours.indices if name != "imagenet1k" else range(5):
        (img, label), (ref_img, ref_label) = ours.data[i], ref[i]
        assert label == ref_label and img.size == ref_img.size


@needs_cb
@pytest.mark.parametrize("name", [pytest.param("mscoco_captions", marks=needs_coco), "flickr30k"])
def test_same_captions_as_clip_benchmark(name, tmp_path):
    from clip_benchmark.datasets.builder import build_dataset

    getattr(L, f"make_{name}")(tmp_path)
    ref = build_dataset(name, root=str(tmp_path), split="test", download=False, task="zeroshot_retrieval")
    ours = load_retrieval(EvalDataset(name=name, root=str(tmp_path)))
    assert len(ours.indices) == len(ref)
    for i in range(len(ref)):
        assert ours.captions[i] == ref[i][1] and ours.data[i][0].size == ref[i][0].size


@needs_cb
def test_templates_and_names_come_from_the_package():
    from rwkv_clip.callbacks.datasets import clip_benchmark_file

    templates = clip_benchmark_file("templates")
    assert len(templates["imagenet1k"]) == 80 and len(templates["cifar10"]) == 18 and len(templates["cars"]) == 8
    names = clip_benchmark_file("classnames")
    assert len(names["caltech101"]) == 102 and names["caltech101"][0] == "background"
    if SHARED.is_dir():  # the reference copy in ../shared/data is the same file
        assert templates == json.loads((SHARED / "en_zeroshot_classification_templates.json").read_text())
        assert names == json.loads((SHARED / "en_classnames.json").read_text())


def test_without_clip_benchmark_the_error_says_what_to_do(tmp_path, monkeypatch):
    from rwkv_clip.callbacks import datasets

    def absent(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(datasets.resources, "files", absent)
    L.make_dtd(tmp_path)
    with pytest.raises(ModuleNotFoundError, match=r"rwkv-clip\[eval\].*'templates' JSON file"):
        load_classification(EvalDataset(name="dtd", root=str(tmp_path)))
