"""Convert a released RWKV-CLIP checkpoint (the official ``model_31.pt``) into a checkpoint of this project.

    python -m rwkv_clip.convert model_31.pt rwkv_clip_b32_yfcc15m.ckpt

The official ``train.py`` saves the DDP model's plain state_dict. Its keys, after the ``module.`` (DDP) and
``_orig_mod.`` (torch.compile) prefixes are stripped, map to ours as follows (first matching rule wins):

    official                                          ours
    logit_scale                                       logit_scale
    image_model.patch_embed.projection.{weight,bias}  image_encoder.patch_embed.{weight,bias}
    image_model.layers.N.ffn.spatial_mix_{k,r}        image_encoder.blocks.N.ffn.time_maa_{k,r}   (same values)
    image_model.layers.N.*                            image_encoder.blocks.N.*
    image_model.ln1.*  (the tower's final norm)       image_encoder.ln_out.*
    image_model.pos_embed                             image_encoder.pos_embed
    text_model.*                                      text_encoder.*   (RWKV-LM names, identical)

Every tensor is stored as float32: the official text tower keeps ``time_decay`` and ``time_faaaa`` in bfloat16
(exactly representable in float32). Every tower setting is read from the tensor shapes; the text tower gets
``pooling: published`` (all 77 positions averaged, padding included), the pooling these weights were trained with.

The result is a Lightning-style checkpoint: ``load_model`` reads it, ``python main.py validate --ckpt_path`` rebuilds
the model from it, and ``model.init_args.pretrained_path`` fine-tunes from it (so does the official file itself).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

# Official key -> ours, after the wrapper prefixes are stripped; the first pattern that matches is applied.
KEY_RULES: list[tuple[str, str]] = [
    (r"^image_model\.patch_embed\.projection\.", "image_encoder.patch_embed."),
    (r"^image_model\.layers\.(\d+)\.ffn\.spatial_mix_([kr])$", r"image_encoder.blocks.\1.ffn.time_maa_\2"),
    (r"^image_model\.layers\.", "image_encoder.blocks."),
    (r"^image_model\.ln1\.", "image_encoder.ln_out."),
    (r"^image_model\.", "image_encoder."),
    (r"^text_model\.", "text_encoder."),
]
OFFICIAL_KEY_EXAMPLES = (
    "logit_scale, image_model.pos_embed, image_model.patch_embed.projection.weight, "
    "image_model.layers.N.att.key.weight, image_model.layers.N.ffn.spatial_mix_k, image_model.ln1.weight, "
    "text_model.emb.weight, text_model.blocks.N.att.time_decay, text_model.ln_out.weight"
)
# The towers' class paths, as LightningCLI writes them into a checkpoint's hyperparameters.
IMAGE_CLASS = "rwkv_clip.backbones.VisionRWKV"
TEXT_CLASS = "rwkv_clip.backbones.TextRWKV"
TEXT_CONTEXT_LENGTH = 77  # CLIP's; the text tower has no position embedding, so no shape records it
CLIP_VOCAB_SIZE = 49408


def strip_wrappers(key: str) -> str:
    """Drop the DDP ``module.`` prefix and every torch.compile ``_orig_mod.`` segment from a parameter name."""
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def is_official_state_dict(obj: Any) -> bool:
    """True for a plain state_dict with the official RWKV-CLIP keys (``image_model.*``, ``text_model.*``)."""
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return False
    keys = [strip_wrappers(k) for k in obj if isinstance(k, str)]
    return any(k.startswith("image_model.") for k in keys) and any(k.startswith("text_model.") for k in keys)


def rename_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official state_dict with our key names, every floating tensor as float32."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = strip_wrappers(key)
        for pattern, replacement in KEY_RULES:
            if re.match(pattern, name):
                name = re.sub(pattern, replacement, name)
                break
        renamed[name] = value.float() if value.is_floating_point() else value
    return renamed


def _shape(state: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"the checkpoint has no {key!r}, which gives the tower's size; official keys look like "
                         f"{OFFICIAL_KEY_EXAMPLES}")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"{key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def _depth(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not ids or ids != set(range(len(ids))):
        raise ValueError(f"the checkpoint's {prefix}N blocks are missing or not numbered 0..N-1 (found {sorted(ids)})")
    return len(ids)


def tower_specs(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """``{class_path, init_args}`` of both RWKV towers, read from the shapes of a state_dict with our key names."""
    width, in_chans, patch, patch_w = _shape(state, "image_encoder.patch_embed.weight", 4)
    if patch != patch_w:
        raise ValueError(f"image patches must be square, got {patch}x{patch_w}")
    tokens = _shape(state, "image_encoder.pos_embed", 3)[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"image_encoder.pos_embed has {tokens} positions, not a square grid")
    heads, head_size = _shape(state, "image_encoder.blocks.0.att.time_faaaa", 2)
    hidden = _shape(state, "image_encoder.blocks.0.ffn.key.weight", 2)[0]
    if hidden % width:
        raise ValueError(f"the image channel-mix width {hidden} is not a multiple of the tower width {width}")
    image = {
        "class_path": IMAGE_CLASS,
        "init_args": {"img_size": grid * patch, "patch_size": patch, "in_chans": in_chans, "width": width,
                      "depth": _depth(state, "image_encoder.blocks."), "head_size": head_size,
                      "mlp_ratio": float(hidden // width)},
    }
    vocab_size, text_width = _shape(state, "text_encoder.emb.weight", 2)
    text_head_size = _shape(state, "text_encoder.blocks.0.att.time_faaaa", 2)[1]
    text = {
        "class_path": TEXT_CLASS,
        "init_args": {"vocab_size": vocab_size, "context_length": TEXT_CONTEXT_LENGTH, "width": text_width,
                      "depth": _depth(state, "text_encoder.blocks."), "head_size": text_head_size,
                      "ffn_hidden": _shape(state, "text_encoder.blocks.0.ffn.key.weight", 2)[0],
                      "pooling": "published"},
    }
    return image, text


def official_to_checkpoint(official: Mapping[str, torch.Tensor], tokenizer: Optional[str] = "clip") -> dict:
    """A Lightning-style checkpoint of a :class:`~rwkv_clip.module.CLIPModule` holding the official weights.

    Its ``hyper_parameters`` are what LightningCLI saves: the towers as ``{class_path, init_args}`` plain data, so
    ``main.py validate --ckpt_path`` and ``load_model`` rebuild the model without a model config.
    """
    import lightning

    state = rename_official(official)
    image, text = tower_specs(state)
    if image["init_args"]["width"] != text["init_args"]["width"]:
        raise ValueError(f"the image tower is {image['init_args']['width']} wide and the text tower "
                         f"{text['init_args']['width']}: the official model has no projection, so they must match")
    vocab_size = text["init_args"]["vocab_size"]
    if tokenizer == "clip" and vocab_size != CLIP_VOCAB_SIZE:
        raise ValueError(f"the text tower has {vocab_size} tokens, CLIP's BPE (tokenizer 'clip') {CLIP_VOCAB_SIZE}: "
                         "give the tokenizer these weights were trained with (a tokenizer.json or merges path), or null")
    return {
        "state_dict": state,
        "hyper_parameters": {
            "_class_path": "rwkv_clip.module.CLIPModule",
            "_instantiator": "lightning.pytorch.cli.instantiate_module",
            "image_encoder": image,
            "text_encoder": text,
            "embed_dim": None,
            "tokenizer": tokenizer,
        },
        "hparams_name": "kwargs",
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
    }


def read_checkpoint(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file. ``mmap`` maps the
    tensors instead of reading them (for a look at the keys and hyperparameters)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # files in the pre-1.6 format cannot be mapped
                pass
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only refusals all land here
        raise ValueError(f"cannot read {str(path)!r} as a PyTorch checkpoint (read with weights_only=True, so "
                         f"files that need code to unpickle are refused): {err}") from err


def convert(source: str, destination: str, tokenizer: Optional[str] = "clip") -> Path:
    """Convert an official RWKV-CLIP checkpoint into a checkpoint of this project.

    Args:
        source: the official file (a plain state_dict such as ``model_31.pt``).
        destination: where to write the converted checkpoint (``.ckpt``).
        tokenizer: the tokenizer saved with the model: ``clip`` (CLIP's BPE from the installed open_clip, what the
            released models use), a ``tokenizer.json`` or CLIP merges path, or null.
    """
    official = read_checkpoint(source)
    if not is_official_state_dict(official):
        raise ValueError(f"{source!r} is not an official RWKV-CLIP checkpoint: expected a plain state_dict with keys "
                         f"like {OFFICIAL_KEY_EXAMPLES}")
    checkpoint = official_to_checkpoint(official, tokenizer)

    from rwkv_clip.inference import model_from_checkpoint  # builds the model: every key and shape is checked

    model = model_from_checkpoint(checkpoint, str(source))
    out = Path(destination)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    image, text = checkpoint["hyper_parameters"]["image_encoder"], checkpoint["hyper_parameters"]["text_encoder"]
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()):,} parameters; image {image['init_args']}; "
          f"text {text['init_args']}; tokenizer {tokenizer!r}")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m rwkv_clip.convert SOURCE DESTINATION [--tokenizer clip]``: the exit status (0 written, 1 bad
    input, printed as one line without a traceback)."""
    from rwkv_clip.command import run

    return run(convert, argv, prog="python -m rwkv_clip.convert", positional=("source", "destination"))


if __name__ == "__main__":
    sys.exit(main())
