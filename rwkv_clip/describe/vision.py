"""Images for the captioner and the tagger: reading a row's image, and the two local vision backends.

- :func:`load_image` reads a row's image cell (bytes, a path, a ``data:`` URI) and decodes it fully, so a
  truncated or corrupt file is found here and its row is marked failed with the reason, never dropped.
- :class:`TransformersCaptioner`: a local ``transformers`` image-to-text model from a directory (BLIP, GIT,
  Florence-2, a VisionEncoderDecoder and the like), batched, on the GPU when there is one.
- :class:`ClipTagger`: zero-shot tagging with a CLIP model of this project (or a released RWKV-CLIP file) over a
  vocabulary file: the image is compared with every tag's text embedding, and the ``top_k`` tags whose softmax
  probability is at least ``threshold`` are kept.

The OpenAI-compatible server needs no class of its own: :meth:`rwkv_clip.describe.client.Backend.look` sends the
image inline (a base64 ``data:`` URI in an ``image_url`` part), which vLLM, llama.cpp server and Ollama accept.
"""

from __future__ import annotations

import base64
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from rwkv_clip.describe.client import Backend
from rwkv_clip.tables import decode_data_uri, is_url

log = logging.getLogger("rwkv_clip.describe")

_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


class UnreadableImage(ValueError):
    """A row's image is missing, cannot be read or cannot be decoded; the row is marked failed with this reason."""


@dataclass
class LoadedImage:
    """A decoded image (RGB, for local models) and the bytes to send to a server."""

    pil: Any
    data: bytes
    mime: str

    def data_uri(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


def load_image(value: Any, max_side: int = 0) -> LoadedImage:
    """The image of a row's ``image`` cell (bytes, an absolute path or a ``data:`` URI, as
    :func:`rwkv_clip.tables.image_value` leaves it), fully decoded. Images whose longer side exceeds ``max_side``
    (0: no limit) are shrunk and sent as JPEG, as are formats a server may not take (BMP, TIFF, ...)."""
    from PIL import Image

    if value is None or value == "":
        raise UnreadableImage("no image in this row")
    if isinstance(value, (bytes, bytearray)):
        data, where = bytes(value), "image bytes"
    elif isinstance(value, str) and value.startswith("data:"):
        try:
            data, where = decode_data_uri(value), "data URI"
        except ValueError as e:
            raise UnreadableImage(f"data URI: {e}") from None
    elif isinstance(value, str) and is_url(value):
        raise UnreadableImage(f"{value}: images are read from local files, not URLs; download them first "
                              "(e.g. with img2dataset) and point the image column at the files")
    else:
        where = str(value)
        try:
            data = Path(where).read_bytes()
        except OSError as e:
            raise UnreadableImage(f"{where}: {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()  # decode it all: a truncated file fails here, not inside the model
            pil = im.convert("RGB")
    except Image.UnidentifiedImageError:
        raise UnreadableImage(f"{where}: not an image, or a format PIL cannot read") from None
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        raise UnreadableImage(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
    mime = _MIME.get(fmt or "")
    if mime is None or (max_side and max(pil.size) > max_side):
        if max_side and max(pil.size) > max_side:
            pil.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=90)
        data, mime = buf.getvalue(), "image/jpeg"
    return LoadedImage(pil, data, mime)


def _device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


class TransformersCaptioner(Backend):
    """A local ``transformers`` image-to-text model from a directory, batched (``look`` gets up to ``batch_size``
    images per call). ``prompt`` is the text the model continues or the task token it expects ("a picture of"
    for BLIP, "<CAPTION>" for Florence-2; None for models that take none, e.g. GIT and VisionEncoderDecoder)."""

    def __init__(self, model_dir: str, batch_size: int = 16, max_new_tokens: int = 40, device: str = "auto",
                 prompt: Optional[str] = None, num_beams: int = 1, trust_remote_code: bool = False) -> None:
        if not Path(model_dir).is_dir():
            raise ValueError(f"--caption_model {model_dir!r} must be a local model directory for the transformers "
                             "captioner (save one with model.save_pretrained(dir) and processor.save_pretrained(dir))")
        try:
            import torch
            import transformers
        except ImportError as e:
            raise ImportError("the transformers captioner needs the `transformers` package: pip install "
                              "'rwkv-clip[describe]' (or serve the model with vLLM and use the openai backend)") from e
        self.torch, self.device = torch, _device(device)
        kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
        self.model = self._load_model(transformers, model_dir, kw)
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model.to(self.device, dtype=dtype).eval()
        self.dtype = dtype
        self.processor, self.tokenizer = self._load_processor(transformers, model_dir, kw)
        self.batch_size, self.concurrency = batch_size, 1  # one model: batch inside one worker
        self.max_new_tokens, self.prompt, self.num_beams = max_new_tokens, prompt, num_beams
        self.model_name = model_dir

    @staticmethod
    def _load_model(transformers: Any, model_dir: str, kw: dict) -> Any:
        errors = []
        for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "VisionEncoderDecoderModel",
                     "AutoModelForCausalLM"):
            cls = getattr(transformers, name, None)
            if cls is None:
                continue
            try:
                return cls.from_pretrained(model_dir, **kw)
            except (ValueError, KeyError, OSError, TypeError) as e:
                errors.append(f"{name}: {str(e).splitlines()[0][:200]}")
        raise ValueError(f"{model_dir} holds no image-to-text model that transformers can load "
                         f"({'; '.join(errors)})")

    @staticmethod
    def _load_processor(transformers: Any, model_dir: str, kw: dict) -> tuple[Any, Any]:
        """An image+text processor, or (for VisionEncoderDecoder dirs that save none) an image processor and a
        tokenizer used side by side."""
        try:
            proc = transformers.AutoProcessor.from_pretrained(model_dir, **kw)
        except (ValueError, KeyError, OSError, TypeError):
            proc = None
        tok = getattr(proc, "tokenizer", None)
        if proc is not None and getattr(proc, "image_processor", None) is not None and tok is not None:
            return proc, tok
        try:
            image_proc = transformers.AutoImageProcessor.from_pretrained(model_dir, **kw)
            tok = transformers.AutoTokenizer.from_pretrained(model_dir, **kw)
        except (ValueError, KeyError, OSError, TypeError) as e:
            raise ValueError(f"{model_dir} has no image processor and tokenizer that transformers can load ({e}); "
                             "save them beside the model with processor.save_pretrained(dir)") from None
        return image_proc, tok

    def look(self, batch: Sequence[tuple[Optional[str], str, LoadedImage]]) -> list[str]:
        torch = self.torch
        images = [image.pil for _, _, image in batch]
        if hasattr(self.processor, "tokenizer"):  # a joint processor: text prompt (if any) and images together
            kw: dict = {"images": images, "return_tensors": "pt"}
            if self.prompt:
                kw.update(text=[self.prompt] * len(images), padding=True)
            enc = self.processor(**kw)
        else:
            enc = self.processor(images=images, return_tensors="pt")
            if self.prompt:
                enc.update(self.tokenizer([self.prompt] * len(images), return_tensors="pt", padding=True,
                                          add_special_tokens=False))
        enc = {k: (v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device))
               for k, v in enc.items() if hasattr(v, "to")}
        gen = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False)
        with torch.inference_mode():
            out = self.model.generate(**enc, **gen)
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        # BLIP and GIT repeat the text they continue (with other special tokens around it, so it is cut as text);
        # Florence-2 answers a task token without repeating it.
        p = " ".join(self.prompt.split()).lower() if self.prompt else ""
        return [t.strip()[len(p):].strip() if p and t.strip().lower().startswith(p) else t.strip() for t in texts]


def read_vocabulary(path: str) -> list[str]:
    """Tags, one a line; blank lines and lines starting with # are skipped, repeats kept once."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--vocabulary {path!r} is not a file; pass a text file with one tag per line")
    tags, seen = [], set()
    for line in p.read_text(encoding="utf-8").splitlines():
        tag = " ".join(line.split())
        if tag and not tag.startswith("#") and tag.lower() not in seen:
            seen.add(tag.lower())
            tags.append(tag)
    if not tags:
        raise ValueError(f"--vocabulary {path} holds no tags; write one tag per line")
    return tags


class ClipTagger(Backend):
    """Zero-shot tags from a CLIP model (a checkpoint of this project or a released RWKV-CLIP file): the softmax
    over the vocabulary of the image-text similarity times the model's logit scale; the ``top_k`` most likely tags
    whose probability is at least ``threshold``, most likely first. Each tag's text embedding is the mean over
    ``templates`` ("a photo of a {}."), as in zero-shot classification."""

    def __init__(self, checkpoint: str, vocabulary: Sequence[str], top_k: int = 5, threshold: float = 0.05,
                 templates: Sequence[str] = ("a photo of a {}.",), batch_size: int = 64, device: str = "auto",
                 tokenizer: Optional[str] = None) -> None:
        import torch

        from rwkv_clip.inference import load_model

        if top_k < 1 or not 0.0 <= threshold < 1.0:
            raise ValueError(f"--top_k must be >= 1 and --threshold in [0, 1), got {top_k} and {threshold}")
        if not os.path.isfile(checkpoint):
            raise ValueError(f"--tag_model {checkpoint!r} is not a file; pass a checkpoint of this project "
                             "(logs/.../checkpoints/*.ckpt) or a released RWKV-CLIP .pt file")
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"--tag_templates {bad} must each hold one {{}} for the tag")
        self.torch, self.device = torch, _device(device)
        try:
            self.model, self.preprocess, tok = load_model(checkpoint, map_location=self.device, with_transforms=True,
                                                          tokenizer=tokenizer)
        except ValueError as e:
            if "has no tokenizer" not in str(e):
                raise
            raise ValueError(f"{checkpoint} names no tokenizer: pass one with --tokenizer (a tokenizer.json, CLIP's "
                             "merges file or 'clip'; the demo model's is data/demo/tokenizer.json)") from None
        self.vocabulary, self.top_k, self.threshold = list(vocabulary), top_k, threshold
        self.batch_size, self.concurrency = batch_size, 1
        self.model_name = checkpoint
        with torch.inference_mode():
            embs = []
            for start in range(0, len(self.vocabulary), 256):
                chunk = self.vocabulary[start:start + 256]
                per_template = [self.model.encode_text(tok([t.format(tag) for tag in chunk]).to(self.device))
                                for t in templates]
                embs.append(torch.nn.functional.normalize(torch.stack(per_template).mean(0), dim=-1))
            self.text_emb = torch.cat(embs)
            self.scale = float(self.model.logit_scale.exp())

    def probabilities(self, images: Sequence[Any]) -> Any:
        """(len(images), len(vocabulary)) tag probabilities of PIL images."""
        torch = self.torch
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        with torch.inference_mode():
            return (self.scale * self.model.encode_image(x) @ self.text_emb.T).softmax(-1).float().cpu()

    def look(self, batch: Sequence[tuple[Optional[str], str, LoadedImage]]) -> list[str]:
        probs = self.probabilities([image.pil for _, _, image in batch])
        k = min(self.top_k, probs.shape[1])
        top = probs.topk(k, dim=-1)
        return [", ".join(self.vocabulary[i] for p, i in zip(ps.tolist(), idx.tolist()) if p >= self.threshold)
                for ps, idx in zip(top.values, top.indices)]
