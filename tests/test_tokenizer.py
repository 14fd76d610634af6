"""Tokenizer: CLIP's BPE from its merges file, tokenizer.json files, training, and the sot/eot/pad layout."""

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from rwkv_clip.backbones.utils import padding_mask
from rwkv_clip.tokenizer import Tokenizer, main

CLIP_MERGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "bpe_simple_vocab_16e6.txt.gz"
needs_clip = pytest.mark.skipif(not CLIP_MERGES.is_file(), reason=f"reference data {CLIP_MERGES} not present")

CAPTIONS = [
    "a red circle on a gray background.", "a blue square on a white background.", "IMG_2034 jpg red circl",
    "A large green star sits near the top of a noisy picture.", "a photo of a cat.", "two dogs playing in the snow",
] * 20


@pytest.fixture(scope="module")
def clip_tok():
    if not CLIP_MERGES.is_file():
        pytest.skip(f"reference data {CLIP_MERGES} not present")
    return Tokenizer.from_clip_merges(str(CLIP_MERGES))


@pytest.fixture(scope="module")
def trained():
    return Tokenizer.train(CAPTIONS, vocab_size=300, min_frequency=1, context_length=16)


def _real(row: torch.Tensor, tok: Tokenizer) -> list[int]:
    return row[: int(padding_mask(row[None], tok.pad_id)[0].sum())].tolist()


# ---------------------------------------------------------------- CLIP
@needs_clip
def test_clip_vocabulary_and_known_ids(clip_tok):
    assert clip_tok.vocab_size == 49408
    assert (clip_tok.sot_id, clip_tok.eot_id, clip_tok.pad_id, clip_tok.context_length) == (49406, 49407, 0, 77)
    # Token ids of OpenAI CLIP's tokenizer.
    assert _real(clip_tok("a photo of a cat.")[0], clip_tok) == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert _real(clip_tok("hello world")[0], clip_tok) == [49406, 3306, 1002, 49407]
    # CLIP lower-cases, collapses whitespace and unescapes HTML.
    assert torch.equal(clip_tok("  A PHOTO\n of a\tCat. ")[0], clip_tok("a photo of a cat.")[0])
    assert torch.equal(clip_tok("cats &amp; dogs")[0], clip_tok("cats & dogs")[0])


@needs_clip
def test_clip_decode_and_truncation(clip_tok):
    ids = clip_tok(["a photo of a cat.", "word " * 200])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert clip_tok.decode(ids[0]) == "a photo of a cat ."  # CLIP's decoder puts a space at every word end
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407  # truncated, eot kept at the end
    assert clip_tok.decode(ids[1]) == " ".join(["word"] * 75)
    # Decoding then encoding gives the same ids for text without unusual spacing.
    text = "two dogs playing in the snow, 2019!"
    assert torch.equal(clip_tok(clip_tok.decode(clip_tok(text)[0]))[0], clip_tok(text)[0])


@needs_clip
def test_clip_tokenizer_saves_as_json(clip_tok, tmp_path):
    path = tmp_path / "clip.json"
    clip_tok.save(str(path))
    again = Tokenizer.load(str(path))
    assert (again.vocab_size, again.sot_id, again.eot_id, again.pad_id) == (49408, 49406, 49407, 0)
    assert torch.equal(again("a photo of a cat.")[0], clip_tok("a photo of a cat.")[0])


# ---------------------------------------------------------------- trained BPE
def test_trained_specials_and_round_trip(trained):
    assert (trained.pad_id, trained.sot_id, trained.eot_id) == (0, 1, 2)
    assert trained.vocab_size <= 300
    for text in ["a red circle on a gray background.", "unseen words: Zebra ß 😀 12345 !?", "x"]:
        ids = trained(text, context_length=64)[0]
        assert ids[0] == trained.sot_id
        # Byte-level: any text round-trips exactly, up to CLIP's normalisation (lower case, single spaces).
        assert trained.decode(ids) == " ".join(text.lower().split())


def test_truncation_keeps_eot_and_padding_rule(trained):
    long_text = " ".join(["background"] * 40)
    ids = trained([long_text, "a cat", ""])
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    assert ids[0, 0] == trained.sot_id and ids[0, -1] == trained.eot_id
    assert (ids[0] != trained.pad_id).all()
    n = len(trained.encode("a cat"))
    assert ids[1, n + 1] == trained.eot_id and (ids[1, n + 2:] == trained.pad_id).all()
    assert ids[2, :2].tolist() == [trained.sot_id, trained.eot_id] and (ids[2, 2:] == trained.pad_id).all()
    # The towers' padding mask covers exactly sot..eot.
    assert padding_mask(ids, trained.pad_id).sum(1).tolist() == [16, n + 2, 2]
    assert trained("a cat", context_length=40).shape == (1, 40)
    assert trained("a cat").shape == (1, 16)


def test_batch_matches_single(trained):
    texts = CAPTIONS[:6]
    batch = trained(texts)
    assert batch.shape == (6, 16)
    for row, text in zip(batch, texts):
        assert torch.equal(row, trained(text)[0])


def test_save_load_round_trip(trained, tmp_path):
    path = tmp_path / "tok.json"
    trained.save(str(path))
    again = Tokenizer.load(str(path), context_length=16)
    assert torch.equal(again(CAPTIONS[:6]), trained(CAPTIONS[:6]))
    assert (again.pad_id, again.sot_id, again.eot_id, again.vocab_size) == (0, 1, 2, trained.vocab_size)


def test_bad_inputs(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="unknown tokenizer file type"):
        Tokenizer.load(str(tmp_path / "tok.model"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizers JSON"):
        Tokenizer.load(str(bad))
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(CAPTIONS, vocab_size=100)
    with pytest.raises(ValueError, match="context_length"):
        trained("a", context_length=1)
    with pytest.raises(ValueError, match="one row"):
        trained.decode(torch.zeros(2, 3, dtype=torch.long))


def test_train_cli_on_litdata_and_text_files(tmp_path, capsys):
    from litdata.streaming.writer import BinaryWriter

    data = tmp_path / "train"
    writer = BinaryWriter(str(data), chunk_bytes="64KB")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    for i in range(30):
        writer.add_item(i, {"key": str(i), "image": buf.getvalue(), "text": f"zebra{i % 3}",
                            "synthetic_caption": "a quokka on a unicycle" if i % 2 else "",
                            "generated_caption": "an axolotl", "tags": ""})
    writer.done()
    writer._merge_no_wait()
    extra = tmp_path / "more.txt"
    extra.write_text("platypus platypus\nplatypus\n")
    out = tmp_path / "tok.json"
    main(["train", "--input", str(data), str(extra), "--vocab-size", "300", "--min-frequency", "1",
          "--output", str(out)])
    assert "wrote" in capsys.readouterr().out
    tok = Tokenizer.load(str(out))
    vocab = json.loads(out.read_text())["model"]["vocab"]
    # All three text fields and the text file were used: their words became single tokens.
    for word in ["Ġquokka", "Ġaxolotl", "Ġplatypus", "Ġzebra"]:
        assert word in vocab, word
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 1, 2)
    with pytest.raises(ValueError, match="not a prepared LitData directory"):
        main(["train", "--input", str(tmp_path), "--output", str(tmp_path / "x.json")])
