"""Tokenizer: CLIP's BPE (ids equal open_clip's), tokenizer.json files, training, and the sot/eot/pad layout.

The CLIP tests read the merges that open_clip ships and compare with ``open_clip.tokenize``; open_clip comes with
the dev extra (``pip install -e ".[dev]"``).
"""

import importlib.util
import io
import json
import random

import pytest
import torch
from PIL import Image

from rwkv_clip.backbones.utils import padding_mask
from rwkv_clip.tokenizer import Tokenizer, clip_merges_path, main

HAVE_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
needs_clip = pytest.mark.skipif(not HAVE_OPEN_CLIP, reason='open_clip is not installed: pip install -e ".[dev]"')

CAPTIONS = [
    "a red circle on a gray background.", "a blue square on a white background.", "IMG_2034 jpg red circl",
    "A large green star sits near the top of a noisy picture.", "a photo of a cat.", "two dogs playing in the snow",
] * 20


@pytest.fixture(scope="module")
def clip_tok():
    if not HAVE_OPEN_CLIP:
        pytest.skip('open_clip is not installed: pip install -e ".[dev]"')
    return Tokenizer.load("clip")


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
    # The same merges through a path the user gives.
    from_path = Tokenizer.load(clip_merges_path())
    assert torch.equal(from_path(CAPTIONS[:6]), clip_tok(CAPTIONS[:6]))


# Each kind of text where a tokenizer can quietly differ from CLIP's cleaning.
HARD_TEXTS = [
    "", "   ", "a photo of a cat.", "Hello   World\n\tagain\r\n",
    "schÃ¶n Ã©tÃ© Ã  Paris", "â€œquotedâ€\x9d and donâ€™t",                       # mojibake
    "The Café’s “special” — don’t ‘quote’", "don't I'LL we'Re",                  # curly quotes, contractions
    "ﬁsh ﬂour oﬀice", "ＦＵＬＬ　ＷＩＤＴＨ　ｔｅｘｔ　１２３！",                           # ligatures, full width
    "ctrl\x00\x07\x1b[31mred\x1b[0m \x1c\x1d\x1e\x1fsep", "zero\u200bwidth soft\u00adhyphen bom\ufeffhere",
    "\u2028line\u2029para\u0085nel\u00a0nbsp\u3000ideo",                          # control / format / spaces
    "ΟΔΟΣ ΣΑΣ Σ ΣΑ ὈΔΥΣΣΕΎΣ", "İstanbul ǅ ß ẞ",                                  # final sigma, special casing
    "cats &amp; dogs &lt;b&gt; &amp;amp; &#39;x&#39; &eacute; &nbsp;! e&#769;",     # HTML entities (twice)
    "<|endoftext|> <|startoftext|> <b>bold</b>", "😀👍🏽 🇫🇷 日本語のテキスト مرحبا १२३ ٤٥٦", "C++ & C# @ 3.14%",
    "word " * 200, "x" * 500, "a\u0301b\u0327 e\u0301",                            # truncation, combining marks
]


@needs_clip
def test_clip_ids_equal_open_clip(clip_tok):
    import open_clip

    ours, theirs = clip_tok(HARD_TEXTS), open_clip.tokenize(HARD_TEXTS)
    for text, a, b in zip(HARD_TEXTS, ours, theirs):
        assert torch.equal(a, b), (text, a[:12].tolist(), b[:12].tolist())
    long = ours[HARD_TEXTS.index("word " * 200)]
    assert long[0] == 49406 and long[-1] == 49407  # truncated at 77 with the end token last
    assert ours[0, :3].tolist() == [49406, 49407, 0]  # the empty string

    # Seeded random text from many scripts and the troublemakers above, a few thousand strings.
    rng = random.Random(0)
    blocks = [(0x0, 0x250), (0x370, 0x530), (0x600, 0x700), (0x900, 0x980), (0x2000, 0x2070), (0x3000, 0x3100),
              (0x4E00, 0x4F00), (0xFB00, 0xFB07), (0xFF00, 0xFFF0), (0x1F300, 0x1F700)]
    pieces = [" ", "  ", "S", "Σ", "'", "'LL", "&amp;", "&#39;", "Ã©", "â€™", "’", "\n"]
    fuzz = []
    for _ in range(2000):
        chars = []
        for _ in range(rng.randint(0, 24)):
            lo, hi = rng.choice(blocks)
            chars.append(chr(rng.randrange(lo, hi)) if rng.random() < 0.6 else rng.choice(pieces))
        fuzz.append("".join(chars))
    ours, theirs = clip_tok(fuzz), open_clip.tokenize(fuzz)
    differ = [text for text, a, b in zip(fuzz, ours, theirs) if not torch.equal(a, b)]
    assert not differ, differ[:5]


@needs_clip
def test_clip_deliberate_differences_from_open_clip(clip_tok):
    """The documented exceptions: text never produces a special token, and U+0345 is kept."""
    import open_clip

    # open_clip turns the literal text "<end_of_text>" into its end token; here it stays text.
    assert open_clip.tokenize("<end_of_text>")[0, :3].tolist() == [49406, 49407, 49407]
    ids = clip_tok("<end_of_text>")[0]
    assert (ids == 49407).sum() == 1 and ids[1] != 49407
    # open_clip's case-insensitive regex drops U+0345 (combining ypogegrammeni); it is kept here.
    assert open_clip.tokenize("a\u0345b")[0, :4].tolist() == [49406, 320, 321, 49407]
    assert len(clip_tok.encode("a\u0345b")) > 2


def test_clip_merges_missing_gives_the_way_out(monkeypatch):
    import importlib.util as util

    monkeypatch.setattr(util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install open_clip_torch"):
        Tokenizer.load("clip")


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
    assert torch.equal(again(HARD_TEXTS), clip_tok(HARD_TEXTS))  # the JSON keeps CLIP's cleaning and lower-casing


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
