"""load_model: open_clip-style use (model, preprocess, tokenizer), and which classes a checkpoint may build."""

import contextlib
import io
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import rwkv_clip
from rwkv_clip import CLIPModule, load_model
from rwkv_clip.datamodules import eval_transform
from rwkv_clip.tokenizer import Tokenizer
from tiny_towers import TinyImageTower, TinyTextTower

REPO = Path(__file__).resolve().parents[1]
IMAGE = {"class_path": "rwkv_clip.backbones.VisionRWKV",
         "init_args": {"img_size": 32, "patch_size": 8, "width": 32, "depth": 1, "head_size": 16}}
TEXT = {"class_path": "rwkv_clip.backbones.TextRWKV",
        "init_args": {"vocab_size": 300, "context_length": 20, "width": 32, "depth": 1, "head_size": 16,
                      "ffn_hidden": 64}}


def save_checkpoint(path: Path, image: dict, text: dict, model: CLIPModule, **hparams) -> Path:
    """What LightningCLI writes: weights, and the towers as class_path/init_args plain data."""
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": "2.6.0",
                "hyper_parameters": {"_class_path": "rwkv_clip.module.CLIPModule", "image_encoder": image,
                                     "text_encoder": text, **hparams}}, path)
    return path


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    captions = ["a photo of a cat.", "a photo of a dog.", "a red circle", "a blue square", "a bird"] * 10
    Tokenizer.train(captions, vocab_size=300, min_frequency=1).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def rwkv_checkpoint(tmp_path_factory, tokenizer_json) -> Path:
    from rwkv_clip.backbones import TextRWKV, VisionRWKV

    torch.manual_seed(0)
    model = CLIPModule(VisionRWKV(**IMAGE["init_args"]), TextRWKV(**TEXT["init_args"]), tokenizer=tokenizer_json)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt", IMAGE, TEXT, model, tokenizer=tokenizer_json)


def test_with_transforms_gives_model_preprocess_and_tokenizer(rwkv_checkpoint, tokenizer_json):
    model, preprocess, tokenizer = load_model(rwkv_checkpoint, with_transforms=True)
    assert isinstance(model, CLIPModule) and not model.training
    picture = Image.new("RGB", (70, 50), (200, 30, 30))
    assert torch.equal(preprocess(picture), eval_transform(32)(picture))  # CLIP eval transform at the tower's size
    assert preprocess(picture).shape == (3, 32, 32)
    assert tokenizer.context_length == 20 and tokenizer.vocab_size <= 300
    assert torch.equal(tokenizer(["a photo of a cat."]), Tokenizer.load(tokenizer_json, 20)(["a photo of a cat."]))
    with torch.no_grad():
        image, text = model(preprocess(picture)[None], tokenizer(["a photo of a cat.", "a dog"]))
    assert image.shape == (1, 32) and text.shape == (2, 32)
    # The same pieces as methods of the model.
    assert model.get_tokenizer() is tokenizer and model.get_preprocess()(picture).shape == (3, 32, 32)


def test_tokenizer_can_be_given_and_its_absence_is_explained(tmp_path, tokenizer_json):
    from rwkv_clip.backbones import TextRWKV, VisionRWKV

    model = CLIPModule(VisionRWKV(**IMAGE["init_args"]), TextRWKV(**TEXT["init_args"]))
    path = save_checkpoint(tmp_path / "no_tok.ckpt", IMAGE, TEXT, model)
    with pytest.raises(ValueError, match="has no tokenizer.*tokenizer=...*load_model"):
        load_model(path, with_transforms=True)
    _, _, tokenizer = load_model(path, with_transforms=True, tokenizer=tokenizer_json)
    assert tokenizer.context_length == 20


def test_readme_example_classifies_an_image_folder(rwkv_checkpoint, tmp_path):
    """The README's Python example, run as written on a folder of pictures (only the paths are swapped)."""
    readme = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "with_transforms=True" in b]
    assert len(blocks) == 1, "the README should hold one example that uses load_model(..., with_transforms=True)"
    code = blocks[0]
    checkpoint = re.search(r'load_model\("([^"]+)"', code).group(1)
    folder = re.search(r'Path\("([^"]+)"\)', code).group(1)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (48 + 8 * i, 40), colour).save(photos / f"img{i}.{'png' if i else 'jpg'}")
    (photos / "notes.txt").write_text("not an image")
    code = code.replace(f'"{checkpoint}"', repr(str(rwkv_checkpoint))).replace(f'Path("{folder}")', f"Path({str(photos)!r})")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["img0.jpg", "img1.png", "img2.png"], lines


def test_a_checkpoint_does_not_read_the_files_its_run_started_from(tmp_path):
    """A LiT run's TimmViT(pretrained_path) and the model's pretrained_path are history: the checkpoint holds the
    weights, so it loads where those files are gone, and a later fit does not go back to them."""
    from rwkv_clip.backbones import TextRWKV, TimmViT

    arch = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1,
            "num_heads": 2}
    model = CLIPModule(TimmViT(**arch), TextRWKV(**TEXT["init_args"]))
    image = {"class_path": "rwkv_clip.backbones.TimmViT", "init_args": {**arch, "pretrained_path": str(tmp_path / "gone.pth")}}
    path = save_checkpoint(tmp_path / "lit.ckpt", image, TEXT, model, pretrained_path=str(tmp_path / "gone.ckpt"),
                           lock_image=True)
    loaded = load_model(path)
    assert loaded.pretrained_path is None and loaded.lock_image
    assert torch.equal(loaded.image_encoder.model.pos_embed, model.image_encoder.model.pos_embed)


# ---------------------------------------------------------------------------- which classes may be built
EVIL = '''
from pathlib import Path
import torch
Path(__file__).with_name("imported.marker").write_text("module code ran")

class Tower(torch.nn.Module):
    width = 16
'''


def test_classes_outside_the_backbones_are_refused_before_import(tmp_path, monkeypatch):
    (tmp_path / "evil_tower_module.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = CLIPModule(TinyImageTower(), TinyTextTower())
    evil = {"class_path": "evil_tower_module.Tower", "init_args": {}}
    path = save_checkpoint(tmp_path / "evil.ckpt", evil, {"class_path": "tiny_towers.TinyTextTower"}, model)
    with pytest.raises(ValueError, match=r"outside rwkv_clip.backbones.*allowed_classes=\[Tower\]"):
        load_model(path)
    assert not (tmp_path / "imported.marker").exists() and "evil_tower_module" not in sys.modules


def test_classes_passed_in_are_allowed(tmp_path):
    torch.manual_seed(0)
    model = CLIPModule(TinyImageTower(), TinyTextTower())
    path = save_checkpoint(tmp_path / "tiny.ckpt", {"class_path": "tiny_towers.TinyImageTower", "init_args": {}},
                           {"class_path": "tiny_towers.TinyTextTower", "init_args": {"vocab_size": 64}}, model)
    with pytest.raises(ValueError, match="outside rwkv_clip.backbones"):
        load_model(path)
    loaded = load_model(path, allowed_classes=[TinyImageTower, TinyTextTower])
    images, tokens = torch.randn(2, 3, 16, 16), torch.randint(1, 64, (2, 6))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(images, tokens), model.eval()(images, tokens)))


def test_a_backbones_path_that_is_not_a_tower_is_refused(tmp_path, rwkv_checkpoint):
    checkpoint = torch.load(rwkv_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["image_encoder"] = {"class_path": "rwkv_clip.backbones.rwkv.math", "init_args": {}}
    torch.save(checkpoint, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match="is not a tower"):
        load_model(tmp_path / "odd.ckpt")
    checkpoint["hyper_parameters"]["image_encoder"] = {"class_path": "rwkv_clip.backbones.NoSuchTower"}
    torch.save(checkpoint, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match="cannot build the image_encoder 'rwkv_clip.backbones.NoSuchTower'"):
        load_model(tmp_path / "odd.ckpt")


def test_public_names():
    assert rwkv_clip.load_model is load_model and rwkv_clip.CLIPModule is CLIPModule
