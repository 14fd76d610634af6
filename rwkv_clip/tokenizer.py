"""Text tokenizer: CLIP's byte-level BPE, any ``tokenizer.json``, or a fresh BPE trained on your captions.

Every flavour returns the same thing: ``tok(texts) -> LongTensor (N, context_length)`` laid out as
``<sot> tokens... <eot> <pad> <pad> ...``. Over-long texts are cut so that ``<eot>`` is always kept
(text towers that pool at the last real token need it).

    tok = Tokenizer.load("data/demo/tokenizer.json")            # a tokenizers JSON file
    tok = Tokenizer.load("clip")                                # CLIP's BPE, merges read from open_clip
    tok = Tokenizer.load("bpe_simple_vocab_16e6.txt.gz")        # CLIP's BPE from a merges file you give
    ids = tok(["a photo of a cat.", "a dog"])                   # (2, 77) int64

Train a new one on the captions of a prepared LitData directory (all three text fields) or text files:

    python -m rwkv_clip.tokenizer train --input data/my_set/train --vocab-size 8192 --output tokenizer.json
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

import ftfy
import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from rwkv_clip.schema import TEXT_FIELDS, check_prepared_dir

SOT, EOT, PAD = "<|startoftext|>", "<|endoftext|>", "<pad>"

# CLIP's pre-tokenisation pattern, case-insensitive as CLIP's (it matters after lower-casing too: "'ſ" matches 's).
# CLIP's own pattern starts with its two special tokens; here text never produces them (see Tokenizer).
_CLIP_PATTERN = r"""(?i)'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"

# Start/end token spellings of common tokenizer.json files, tried in order when loading one.
_SOT_NAMES = (SOT, "<s>", "<bos>", "[CLS]", "<|begin_of_text|>")
_EOT_NAMES = (EOT, "</s>", "<eos>", "[SEP]", "<|end_of_text|>")
_PAD_NAMES = (PAD, "[PAD]")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from the 256 byte values to printable unicode characters (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean_text(text: str, lowercase: bool = True) -> str:
    """OpenAI CLIP's (and open_clip's) text cleaning: ftfy's repair, HTML unescaped twice, whitespace collapsed,
    then lower-cased with Python's ``str.lower`` (full Unicode casing, e.g. a word-final capital sigma gives ς)."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = " ".join(text.split())
    return text.lower() if lowercase else text


def clip_merges_path() -> str:
    """Path of CLIP's BPE merges as shipped inside the installed ``open_clip`` package (not imported, only found)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, CLIP_MERGES_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"tokenizer 'clip' reads CLIP's BPE merges ({CLIP_MERGES_FILE}) from the open_clip package, which is not "
        "installed: `pip install open_clip_torch`, or give the path of the merges file instead of 'clip'"
    )


def _lowercases(tok: _HFTokenizer) -> bool:
    """Whether a tokenizer's normalizer lower-cases (then the text is lower-cased in Python first, as CLIP does)."""
    spec = json.loads(tok.to_str()).get("normalizer") or {}
    text = json.dumps(spec)
    return '"type": "Lowercase"' in text or '"lowercase": true' in text


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer`` with CLIP's fixed-length layout (sot ... eot, right-padded with ``pad_id``).

    Attributes: ``vocab_size``, ``pad_id``, ``sot_id``, ``eot_id``, ``context_length``.
    """

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        sot_id: int,
        eot_id: int,
        pad_id: int = 0,
        context_length: int = 77,
    ) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for the start and end tokens), got {context_length}")
        self._tok = tokenizer
        # Padding and truncation are done here (to keep eot), so turn off whatever the JSON file asked for.
        self._tok.no_padding()
        self._tok.no_truncation()
        # Special tokens are placed by id, never read from the text: a caption that spells "<|endoftext|>" is text.
        self._tok.encode_special_tokens = True
        self.lowercase = _lowercases(tokenizer)
        self.sot_id, self.eot_id, self.pad_id = int(sot_id), int(eot_id), int(pad_id)
        self.context_length = int(context_length)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_file(cls, path: str, context_length: int = 77) -> "Tokenizer":
        """Load a ``tokenizers`` JSON file. Start/end/pad tokens are looked up by name (CLIP's first)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist; train one with "
                                    f"`python -m rwkv_clip.tokenizer train --input <data dir> --output {path}`")
        try:
            tok = _HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"could not read {path!r} as a tokenizers JSON file: {e}") from e
        vocab = tok.get_vocab(with_added_tokens=True)

        def find(names: Sequence[str], what: str) -> int | None:
            for name in names:
                if name in vocab:
                    return vocab[name]
            return None

        sot, eot = find(_SOT_NAMES, "start"), find(_EOT_NAMES, "end")
        if sot is None or eot is None:
            raise ValueError(f"{path!r} has no start/end tokens: expected one of {_SOT_NAMES} and one of {_EOT_NAMES}")
        pad = find(_PAD_NAMES, "pad")
        # Without a pad token, use 0 as CLIP does; the towers' padding mask keeps a literal 0 inside the text real.
        return cls(tok, sot, eot, 0 if pad is None else pad, context_length)

    @classmethod
    def from_clip_merges(cls, path: str, context_length: int = 77) -> "Tokenizer":
        """Build OpenAI CLIP's tokenizer from its merges file ``bpe_simple_vocab_16e6.txt.gz``.

        Vocabulary (49408): 256 byte tokens, the same with ``</w>``, 48894 merges, then sot (49406) and eot (49407).
        Padding uses id 0, as in CLIP. The ids equal ``open_clip.tokenize`` (see the README for the exceptions).
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP merges file {path!r} does not exist ({CLIP_MERGES_FILE} from OpenAI CLIP or "
                                    "open_clip); `Tokenizer.load('clip')` reads it from an installed open_clip")
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Same slice as CLIP: skip the version header, keep 49152 - 256 - 2 merges.
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        if len(merges) < 1 or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path!r} does not look like a CLIP merges file (expected 'a b' pairs after a header line)")
        alphabet = list(_bytes_to_unicode().values())
        tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
        vocab = {t: i for i, t in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False)
        tok = _HFTokenizer(bpe)
        # clean_text does CLIP's cleaning in Python; the normalizer only marks the tokenizer as lower-casing (and
        # lower-cases for anyone using the JSON file alone). No NFC: CLIP does not normalise after unescaping HTML.
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        # "</w>" marks a word end: turn it into a space when decoding.
        tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
        tok.add_special_tokens([SOT, EOT])  # -> ids 49406, 49407
        return cls(tok, tok.token_to_id(SOT), tok.token_to_id(EOT), 0, context_length)

    @classmethod
    def load(cls, path: str, context_length: int = 77) -> "Tokenizer":
        """``.json`` -> :meth:`from_file`; CLIP merges ``.txt``/``.txt.gz`` -> :meth:`from_clip_merges`;
        ``"clip"`` -> CLIP's merges from the installed open_clip package (``pip install open_clip_torch``)."""
        if path == "clip":
            return cls.from_clip_merges(clip_merges_path(), context_length)
        if path.endswith(".json"):
            return cls.from_file(path, context_length)
        if path.endswith((".txt", ".txt.gz", ".gz")):
            return cls.from_clip_merges(path, context_length)
        raise ValueError(f"unknown tokenizer file type {path!r}: give a tokenizer.json, CLIP's {CLIP_MERGES_FILE}, "
                         "or 'clip' (CLIP's BPE from the installed open_clip package)")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2,
              context_length: int = 77, show_progress: bool = False) -> "Tokenizer":
        """Train a byte-level BPE on ``texts``. Specials: ``<pad>`` (id 0), ``<|startoftext|>`` (1), ``<|endoftext|>`` (2).

        Same normalisation as CLIP (lower case, collapsed whitespace). GPT-2 style byte-level words (a leading
        space marker instead of CLIP's ``</w>``) so every byte sequence stays encodable even when unseen in training.
        """
        if vocab_size < 256 + 3:
            raise ValueError(f"vocab_size must be >= 259 (256 byte tokens + 3 special tokens), got {vocab_size}")
        tok = _HFTokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence([
            normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, SOT, EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
        tok.train_from_iterator((clean_text(t) for t in texts if t), trainer=trainer)
        return cls(tok, tok.token_to_id(SOT), tok.token_to_id(EOT), tok.token_to_id(PAD), context_length)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._tok.save(path)

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of one text without start/end tokens and without truncation."""
        return self._tok.encode(clean_text(text, self.lowercase), add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """``texts`` -> LongTensor (N, context_length): sot, tokens, eot, then ``pad_id``. A str gives N = 1."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else int(context_length)
        if length < 2:
            raise ValueError(f"context_length must be >= 2, got {length}")
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        if len(texts) == 1:  # avoid encode_batch's thread pool for the per-sample path in loader workers
            encodings = [self._tok.encode(clean_text(texts[0], self.lowercase), add_special_tokens=False)]
        else:
            encodings = self._tok.encode_batch([clean_text(t, self.lowercase) for t in texts], add_special_tokens=False)
        for row, enc in enumerate(encodings):
            ids = [self.sot_id] + enc.ids[: length - 2] + [self.eot_id]  # truncation keeps eot
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one row of ids; stops at the first eot, drops sot and padding after the text."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one row of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        if ids and ids[0] == self.sot_id:
            ids = ids[1:]
        if self.pad_id not in (self.sot_id, self.eot_id):  # trailing padding (only reached without an eot)
            while ids and ids[-1] == self.pad_id:
                ids.pop()
        text = self._tok.decode(ids, skip_special_tokens=False)
        return " ".join(text.split())

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
                f"sot_id={self.sot_id}, eot_id={self.eot_id}, pad_id={self.pad_id})")


# -------------------------------------------------------------------- training CLI
def iter_captions(inputs: Sequence[str], fields: Sequence[str] = TEXT_FIELDS) -> Iterator[str]:
    """Captions from prepared LitData directories (the given text fields) and/or text files (one caption a line)."""
    for path in inputs:
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "index.json")):
                raise ValueError(f"{path!r} is a directory but not a prepared LitData directory (no index.json); "
                                 "prepare it with `python -m rwkv_clip.datamodules.prepare` or pass text files")
            from litdata import StreamingDataset

            check_prepared_dir(path)  # refuses fields stored as pickle before litdata reads a sample
            ds = StreamingDataset(path)
            for i in range(len(ds)):
                sample = ds[i]
                for field in fields:
                    value = sample.get(field, "")
                    if isinstance(value, str) and value:
                        yield value
        elif os.path.isfile(path):
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")
        else:
            raise FileNotFoundError(f"tokenizer training input {path!r} does not exist")


def train_tokenizer(input: list[str], output: str, vocab_size: int = 8192, min_frequency: int = 2,
                    fields: list[str] = list(TEXT_FIELDS)) -> Tokenizer:
    """Train a byte-level BPE on captions and write a tokenizer.json.

    Args:
        input: Prepared LitData directories and/or text files (one caption per line).
        output: Where to write tokenizer.json.
        vocab_size: Vocabulary size including the 3 special tokens.
        min_frequency: Minimum pair count for a merge.
        fields: Text fields read from LitData samples.
    """
    tok = Tokenizer.train(iter_captions(input, fields), vocab_size=vocab_size, min_frequency=min_frequency,
                          show_progress=sys.stderr.isatty())
    tok.save(output)
    print(f"wrote {output}: {tok}")
    return tok


def encode_text(text: str, tokenizer: str, context_length: int = 77) -> list[int]:
    """Print the token ids of a text (start and end tokens included, padding left out).

    Args:
        text: The text to encode.
        tokenizer: A tokenizer.json or CLIP's bpe_simple_vocab_16e6.txt.gz.
        context_length: Tokens per text, start and end included.
    """
    tok = Tokenizer.load(tokenizer, context_length)
    ids = tok(text)[0]
    ids = ids[: int((ids != tok.pad_id).nonzero().max()) + 1].tolist()
    print(json.dumps(ids))
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rwkv_clip.tokenizer {train,encode}``. Errors propagate (a traceback that names the input)."""
    from rwkv_clip.command import run

    return run({"train": train_tokenizer, "encode": encode_text}, argv, prog="python -m rwkv_clip.tokenizer",
               positional=("text",), errors=())


if __name__ == "__main__":
    sys.exit(main())
