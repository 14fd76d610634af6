"""ImageTextDataModule on tiny LitData directories: batches, text choice, eval transform, resume, bad config, bad data."""

import io
import json
import logging
import random
from collections import Counter

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from rwkv_clip.datamodules.image_text import ImageTextDataModule, batch_sizes_per_rank, choose_text
from rwkv_clip.datamodules.prepare import write_samples
from rwkv_clip.schema import CLIP_MEAN, CLIP_STD, UnsafeDatasetError
from rwkv_clip.tokenizer import Tokenizer

N = 48


def _jpeg(i: int, size=(20, 14)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (i * 5 % 256, 100, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _write(path, samples):
    write_samples(samples, str(path), chunk_bytes="4KB")  # prepare's writer; several chunks, as in real data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """48 samples: text "t{i}" always, synthetic "s{i}" on even i, generated "g{i}" on multiples of 3."""
    root = tmp_path_factory.mktemp("litdata")
    samples = [{"key": f"k{i}", "image": _jpeg(i, (20 + i % 5, 14 + i % 7)), "text": f"t{i}",
                "synthetic_caption": f"s{i}" if i % 2 == 0 else "", "generated_caption": f"g{i}" if i % 3 == 0 else "",
                "tags": "x"} for i in range(N)]
    _write(root / "train", samples)
    _write(root / "val", samples[:10])
    words = [s[f] for s in samples for f in ("text", "synthetic_caption", "generated_caption") if s[f]]
    tok = Tokenizer.train(words + [str(d) for d in range(10)] * 3, vocab_size=400, min_frequency=1)
    tok.save(str(root / "tok.json"))
    return root


def make_dm(data, **kw):
    args = dict(train_dir=str(data / "train"), val_dir=str(data / "val"), tokenizer=str(data / "tok.json"),
                image_size=16, batch_size=4, num_workers=0, context_length=8)
    args.update(kw)
    return ImageTextDataModule(**args)


def epoch_texts(dm, epochs=1):
    dm.setup("fit")
    loader = dm.train_dataloader()
    out = []
    for _ in range(epochs):
        for _, tokens in loader:
            out += [dm.tokenizer.decode(t) for t in tokens]
    return out


def test_batch_shapes_dtypes_and_padding(data):
    dm = make_dm(data)
    dm.setup("fit")
    images, tokens = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert tokens.shape == (4, 8) and tokens.dtype == torch.long
    tok = dm.tokenizer
    for row in tokens:
        end = row.tolist().index(tok.eot_id)
        assert row[0] == tok.sot_id and (row[end + 1:] == tok.pad_id).all()
    # CLIP normalisation: the solid colour (i*5, 100, 200) comes out as (c/255 - mean) / std.
    g = (100 / 255 - CLIP_MEAN[1]) / CLIP_STD[1]
    assert images[:, 1].mean().item() == pytest.approx(g, abs=0.05)
    val_images, val_tokens = next(iter(dm.val_dataloader()))
    assert val_images.shape == (4, 3, 16, 16) and val_tokens.shape == (4, 8)
    assert dm.image_size == 16 and dm.tokenizer.context_length == 8


def test_every_sample_once_per_epoch_with_available_texts_only(data):
    texts = epoch_texts(make_dm(data, shuffle=True), epochs=3)
    assert len(texts) == 3 * N
    seen = Counter(int(t[1:]) for t in texts)
    assert all(seen[i] == 3 for i in range(N))
    for t in texts:
        i = int(t[1:])
        assert t[0] in "tsg"
        assert not (t[0] == "s" and i % 2) and not (t[0] == "g" and i % 3)  # missing sources are never drawn
    # A sample with all three texts draws each of them over a few epochs (text choice changes per epoch).
    assert len({t[0] for t in texts if int(t[1:]) % 6 == 0}) == 3


def test_disabled_sources(data):
    assert {t[0] for t in epoch_texts(make_dm(data, text_sources=["text"]))} == {"t"}
    texts = epoch_texts(make_dm(data, text_sources=["synthetic_caption"]))
    # Odd samples have no synthetic caption: they get an empty text (sot, eot) rather than a disabled source.
    assert sorted(t for t in texts if t) == sorted(f"s{i}" for i in range(0, N, 2))
    assert texts.count("") == N // 2


def test_text_choice_weights_statistics():
    rng = random.Random(0)
    sample = {"text": "a", "synthetic_caption": "b", "generated_caption": "c"}
    sources = ["text", "synthetic_caption", "generated_caption"]
    counts = Counter(choose_text(sample, sources, [1.0, 2.0, 1.0], rng) for _ in range(8000))
    assert counts["a"] / 8000 == pytest.approx(0.25, abs=0.03)
    assert counts["b"] / 8000 == pytest.approx(0.5, abs=0.03)
    # Missing source: the weights renormalise over the ones present (1 : 1 here).
    counts = Counter(choose_text({**sample, "synthetic_caption": ""}, sources, [1.0, 2.0, 1.0], rng)
                     for _ in range(4000))
    assert set(counts) == {"a", "c"} and counts["a"] / 4000 == pytest.approx(0.5, abs=0.04)
    # Weight 0 disables a source; a sample with nothing left gets "".
    assert {choose_text(sample, sources, [0.0, 1.0, 0.0], rng) for _ in range(100)} == {"b"}
    assert choose_text({"text": "  "}, ["text"], [1.0], rng) == ""


def test_weights_reach_the_loader(data):
    texts = epoch_texts(make_dm(data, weights=[1.0, 0.0, 3.0]), epochs=4)
    both = [t for t in texts if int(t[1:]) % 3 == 0]  # samples that have text and generated
    frac = sum(t[0] == "g" for t in both) / len(both)
    assert 0.6 < frac < 0.9 and not any(t[0] == "s" for t in texts)


def test_validation_text_is_fixed_per_sample(data):
    dm = make_dm(data)
    dm.setup("fit")
    loader = dm.val_dataloader()
    first = torch.cat([t for _, t in loader])
    second = torch.cat([t for _, t in loader])
    assert first.shape == (10, 8) and torch.equal(first, second)


def test_eval_transform(data):
    dm = make_dm(data, image_size=24)
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 15, 30))  # blue left quarter: cut away by the centre crop
    x = dm.eval_transform(image)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    red = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert x[0].mean().item() == pytest.approx(red, abs=0.02)
    assert torch.equal(x, dm.eval_transform(image))
    assert dm.eval_transform(Image.new("L", (10, 40))).shape == (3, 24, 24)  # grayscale, portrait


def test_bad_config_errors(data, tmp_path):
    with pytest.raises(ValueError, match="unknown text source 'tags'"):
        make_dm(data, text_sources=["text", "tags"])
    with pytest.raises(ValueError, match="weights has 2 values but text_sources has 3"):
        make_dm(data, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        make_dm(data, weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="sum to 0"):
        make_dm(data, weights=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="text_sources is empty"):
        make_dm(data, text_sources=[])
    with pytest.raises(ValueError, match="batch_size"):
        make_dm(data, batch_size=0)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*rwkv_clip\.datamodules\.prepare"):
        make_dm(data, train_dir=str(missing)).setup("fit")
    with pytest.raises(FileNotFoundError, match="no index.json"):
        make_dm(data, val_dir=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="none of the text sources"):
        make_dm(data, text_sources=["caption"]).setup("fit")
    with pytest.raises(ValueError, match="torch_threads"):
        make_dm(data, torch_threads=0)


def test_torch_threads_and_vocab_size_are_the_data_modules(data):
    """Any ImageTextDataModule sets the process's intra-op threads in setup, and reports its tokenizer's
    vocabulary (what main.py gives the text tower)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        dm = make_dm(data, torch_threads=1)
        assert torch.get_num_threads() == 2  # not at construction: in setup, in the process that trains
        dm.setup("fit")
        assert torch.get_num_threads() == 1
        make_dm(data).setup("fit")  # null: the thread count is left as it is
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert make_dm(data).vocab_size == Tokenizer.load(str(data / "tok.json")).vocab_size


def test_corrupt_samples_are_replaced_and_counted(tmp_path, data, caplog):
    samples = [{"key": f"k{i}", "image": b"not a jpeg" if i in (0, 5) else _jpeg(i), "text": f"t{i}",
                "synthetic_caption": "", "generated_caption": "", "tags": ""} for i in range(12)]
    _write(tmp_path / "bad", samples)
    dm = make_dm(data, train_dir=str(tmp_path / "bad"), val_dir=None, shuffle=False)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
        batches = list(dm.train_dataloader())
    assert sum(len(t) for _, t in batches) == 12  # batches keep their size (DDP gathers need equal shapes)
    assert dm.train_dataset.num_skipped == 2
    assert "key='k5'" in caplog.text and "2 skipped so far" in caplog.text
    assert dm.val_dataloader() == []


class Recorder(L.LightningModule):
    """Records the decoded caption of every training sample."""

    def __init__(self, tok):
        super().__init__()
        self.tok, self.seen = tok, []
        self.p = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, i):
        self.seen += [self.tok.decode(t) for t in batch[1]]
        return self.p * batch[0].mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_continues_at_the_next_sample(data, tmp_path, num_workers):
    """litdata #775 says resume may restart elsewhere: check that the resumed samples are exactly the rest."""
    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=0, num_sanity_val_steps=0)
    tok = Tokenizer.load(str(data / "tok.json"), 8)

    def dm():
        return make_dm(data, num_workers=num_workers, text_sources=["text"], shuffle=True)

    full = Recorder(tok)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="mid", every_n_train_steps=5, save_top_k=1)
    L.Trainer(max_epochs=2, callbacks=[ckpt], **kw).fit(full, datamodule=dm())
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    # save_top_k=1 with a fixed name keeps the last mid-epoch checkpoint: 20 steps run, the last save is step 20
    # (epoch 1, batch 8 of 12), so the rest of epoch 1 is 16 samples.
    step = saved["global_step"]
    assert step == 20 and "combined_loader" in saved["loops"]["fit_loop"]["state_dict"]
    resumed = Recorder(tok)
    L.Trainer(max_epochs=2, enable_checkpointing=False, **kw).fit(resumed, datamodule=dm(),
                                                                  ckpt_path=str(tmp_path / "mid.ckpt"))
    assert len(full.seen) == 2 * N
    assert resumed.seen == full.seen[step * 4:]
    # Epoch 1 was reshuffled (it differs from epoch 0) and still covers each sample once.
    assert full.seen[N:] != full.seen[:N] and sorted(full.seen[N:]) == sorted(full.seen[:N])


# ----------------------------------------------------------------------------------------- data runs no code
class _RunsCode:
    """Pickled, this object runs code when it is unpickled: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def pickled_data(tmp_path):
    marker = tmp_path / "code_ran"
    samples = [{"key": f"k{i}", "image": _jpeg(i), "text": f"t{i}", "payload": _RunsCode(marker)} for i in range(8)]
    _write(tmp_path / "pickled", samples)
    assert "pickle" in json.loads((tmp_path / "pickled" / "index.json").read_text())["config"]["data_format"]
    return tmp_path / "pickled", marker


@pytest.mark.parametrize("remote", [False, True])
def test_a_field_stored_as_pickle_is_refused_before_any_sample_is_read(data, tmp_path, pickled_data, remote):
    """litdata unpickles such fields when it reads a sample. `local:` is litdata's remote protocol for a folder: it
    fetches index.json into the cache, as for s3://, and the check runs on that copy."""
    path, marker = pickled_data
    train_dir = f"local:{path}" if remote else str(path)
    dm = make_dm(data, train_dir=train_dir, val_dir=None, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UnsafeDatasetError, match=r"'payload' as 'pickle'.*could run code"):
        dm.setup("fit")
    assert dm.train_dataset is None and not marker.exists()
    assert not marker.exists()


@pytest.mark.parametrize("remote", [False, True])
def test_a_damaged_index_json_is_named(data, tmp_path, remote):
    damaged = tmp_path / "damaged"
    _write(damaged, [{"key": "k", "image": _jpeg(0), "text": "t"}])
    (damaged / "index.json").write_text('{"chunks": [')
    train_dir = f"local:{damaged}" if remote else str(damaged)
    with pytest.raises(ValueError, match=r"damaged.index\.json is not valid JSON"):
        make_dm(data, train_dir=train_dir, val_dir=None, cache_dir=str(tmp_path / "cache")).setup("fit")


def test_prepared_data_is_accepted(data):
    dm = make_dm(data)
    dm.setup("fit")
    assert dm.train_dataset.fields == ["key", "image", "text", "synthetic_caption", "generated_caption", "tags"]


# --------------------------------------------------------------------------------------- even splits for DDP
def test_batch_sizes_per_rank_follow_litdata_and_uneven_training_is_refused(data, monkeypatch):
    """litdata gives every rank the same number of whole batches and, without drop_last, the rest to the last
    rank: 48 samples in batches of 5 on 2 ranks are 4 + 4 batches and 8 samples left over."""
    from litdata.utilities.env import _DistributedEnv

    def split(drop_last, num_workers, world_size=2, batch_size=5):
        dm = make_dm(data, batch_size=batch_size, drop_last=drop_last, num_workers=num_workers)
        dataset = dm._dataset(dm.train_dir, train=True)
        dataset.distributed_env = _DistributedEnv(world_size, 0, 1)
        return dm, dataset, batch_sizes_per_rank(dataset, batch_size, num_workers)

    _, _, sizes = split(drop_last=True, num_workers=0)
    assert sizes == [[[5, 5, 5, 5]], [[5, 5, 5, 5]]]
    _, _, sizes = split(drop_last=True, num_workers=2)
    assert sizes == [[[5, 5], [5, 5]], [[5, 5], [5, 5]]]
    dm, dataset, sizes = split(drop_last=False, num_workers=0)
    assert sizes == [[[5, 5, 5, 5]], [[5, 5, 5, 5, 5, 3]]]
    with pytest.raises(ValueError, match=r"splits unevenly over 2 devices.*\[4, 6\].*drop_last: true"):
        dm._check_split(dataset, dm.train_dir, "train_dir", 5)
    dm, dataset, _ = split(drop_last=True, num_workers=0, world_size=16)
    with pytest.raises(ValueError, match="not one batch of 5 for each of 16 devices"):
        dm._check_split(dataset, dm.train_dir, "train_dir", 5)


def test_every_rank_needs_a_validation_batch(data):
    from litdata.utilities.env import _DistributedEnv

    dm = make_dm(data, val_batch_size=4)
    dataset = dm._dataset(dm.val_dir, train=False)  # 10 samples
    dataset.distributed_env = _DistributedEnv(2, 0, 1)
    dm._check_split(dataset, dm.val_dir, "val_dir", 4)  # 1 batch each, the last rank 2 more samples
    assert batch_sizes_per_rank(dataset, 4, 0) == [[[4]], [[4, 2]]]
    dataset = dm._dataset(dm.val_dir, train=False)
    dataset.distributed_env = _DistributedEnv(2, 0, 1)
    with pytest.raises(ValueError, match=r"\[0, 2\] validation batches.*val_batch_size to at most 5"):
        dm._check_split(dataset, dm.val_dir, "val_dir", 8)


def test_augmentation_depends_on_the_sample_and_epoch_not_on_the_worker_layout(tmp_path, data):
    """Crops and flips are seeded by (seed, epoch, sample): the same with 0 or 2 loader workers, new each epoch."""
    import numpy as np

    def noise(i):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    _write(tmp_path / "noise", [{"key": f"k{i}", "image": noise(i), "text": f"t{i}"} for i in range(12)])

    def epochs(num_workers):
        dm = make_dm(data, train_dir=str(tmp_path / "noise"), val_dir=None, num_workers=num_workers,
                     text_sources=["text"])
        dm.setup("fit")
        loader = dm.train_dataloader()
        out = []
        for _ in range(2):  # {text: augmented image} per epoch
            out.append({dm.tokenizer.decode(t): image for images, tokens in loader for image, t in zip(images, tokens)})
        return out

    single, multi = epochs(0), epochs(2)
    for a, b in zip(single, multi):
        assert a.keys() == b.keys() and len(a) == 12
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(torch.equal(single[0][k], single[1][k]) for k in single[0]) <= 1  # new crops every epoch
