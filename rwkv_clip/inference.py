"""Load a trained model for inference: our Lightning checkpoints and the released (official) RWKV-CLIP files.

    model, preprocess, tokenizer = rwkv_clip.load_model("model_31.pt", with_transforms=True)
    image_emb = model.encode_image(preprocess(Image.open("cat.jpg")).unsqueeze(0))
    text_emb = model.encode_text(tokenizer(["a photo of a cat", "a photo of a dog"]))
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.pytorch.cli import instantiate_class
from torch import nn

from rwkv_clip.convert import (
    CLIP_VOCAB_SIZE,
    OFFICIAL_KEY_EXAMPLES,
    is_official_state_dict,
    official_to_checkpoint,
    read_checkpoint,
)
from rwkv_clip.module import CLIPModule

TRUSTED_PACKAGE = "rwkv_clip.backbones."


def _tower_class(class_path: str, allowed_classes: Sequence[type], what: str) -> type:
    """The tower class a checkpoint's ``class_path`` names, checked *before* anything is imported.

    A checkpoint is data from elsewhere, and importing the module it names runs that module's code. So only
    ``rwkv_clip.backbones`` is imported, and other classes are used only when the caller passed them in (matched by
    class name, so a class that moved modules still loads; they are never imported from the checkpoint's path).
    """
    module_name, _, name = class_path.rpartition(".")
    for cls in allowed_classes:
        if name == cls.__name__:
            return cls
    if not class_path.startswith(TRUSTED_PACKAGE):
        raise ValueError(
            f"the checkpoint builds its {what} from {class_path!r}, outside {TRUSTED_PACKAGE.rstrip('.')}: importing "
            f"it would run that module's code. If you trust it, pass the class: load_model(..., allowed_classes=[{name}])"
        )
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot build the {what} {class_path!r} named in the checkpoint: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"the {what} {class_path!r} named in the checkpoint is not a tower (a torch.nn.Module class)")
    return cls


def _build_tower(spec: Any, allowed_classes: Sequence[type], what: str) -> nn.Module:
    if not (isinstance(spec, Mapping) and isinstance(spec.get("class_path"), str)):
        raise ValueError(f"the checkpoint's {what} is not a {{class_path, init_args}} spec: {spec!r}")
    init_args = dict(spec.get("init_args") or {})
    if init_args.get("pretrained_path") is not None:
        init_args["pretrained_path"] = None  # the checkpoint holds the tower's weights
    cls = _tower_class(spec["class_path"], allowed_classes, what)
    try:  # built from where the checked class really lives, which is imported by now
        return instantiate_class((), {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args})
    except TypeError as err:  # init_args that the class does not take (a checkpoint from another version)
        raise ValueError(f"the checkpoint's init_args for its {what} {spec['class_path']!r} do not fit: {err}") from err


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state_dict)``, strict, with an error that lists what is missing or unexpected."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]

    def first(names: list[str]) -> str:
        return f"{len(names)} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"

    if missing or unexpected or wrong:
        parts = [f"missing keys: {first(missing)}" if missing else "",
                 f"unexpected keys: {first(unexpected)}" if unexpected else "",
                 f"wrong shapes: {first(wrong)}" if wrong else ""]
        raise ValueError(
            f"the weights in {source!r} do not fit the model: {'; '.join(p for p in parts if p)}. The model expects "
            f"keys like {', '.join(list(expected)[:4])}, ... (official files: {OFFICIAL_KEY_EXAMPLES})"
        )
    model.load_state_dict(state_dict)


def read_weights(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint file, our Lightning format or an official RWKV-CLIP state_dict, with our
    key names (for starting a run from them)."""
    checkpoint = read_checkpoint(path)
    if is_official_state_dict(checkpoint):
        return official_to_checkpoint(checkpoint, tokenizer=None)["state_dict"]
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        return dict(checkpoint["state_dict"])
    raise _neither_format(path, checkpoint)


def _neither_format(path: Union[str, Path], checkpoint: Any) -> ValueError:
    found = list(checkpoint)[:5] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    return ValueError(
        f"{str(path)!r} is neither a Lightning checkpoint of a CLIPModule (a dict with 'state_dict' and "
        f"'hyper_parameters') nor an official RWKV-CLIP state_dict (keys like {OFFICIAL_KEY_EXAMPLES}); found {found}"
    )


def model_from_checkpoint(
    checkpoint: Mapping[str, Any],
    source: str,
    image_encoder: Optional[nn.Module] = None,
    text_encoder: Optional[nn.Module] = None,
    allowed_classes: Sequence[type] = (),
    tokenizer: Optional[str] = None,
) -> CLIPModule:
    """A :class:`CLIPModule` in eval mode built from a loaded Lightning-style checkpoint (see :func:`load_model`).

    The checkpoint's weights are the model's: a ``pretrained_path`` the run started from is dropped, from the
    model (a later ``fit`` would go back to those weights) and from the towers (TimmViT would read the file).
    """
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    hparams.pop("pretrained_path", None)
    towers = {"image_encoder": image_encoder, "text_encoder": text_encoder}
    for name, given in towers.items():
        spec = hparams.pop(name, None)
        if given is None:
            if spec is None:
                raise ValueError(
                    f"{source!r} does not say how to build its {name} (the model was built in Python, not by "
                    f"main.py): pass {name}=... to load_model"
                )
            towers[name] = _build_tower(spec, allowed_classes, name)
    if tokenizer is not None:
        hparams["tokenizer"] = tokenizer
    model = CLIPModule(**towers, **hparams)
    load_weights(model, checkpoint["state_dict"], source)
    return model.eval()


def load_model(
    checkpoint_path: Union[str, Path],
    image_encoder: Optional[nn.Module] = None,
    text_encoder: Optional[nn.Module] = None,
    map_location: Union[str, torch.device] = "cpu",
    with_transforms: bool = False,
    tokenizer: Optional[str] = None,
    allowed_classes: Sequence[type] = (),
):
    """A :class:`CLIPModule` in eval mode with the weights of a checkpoint.

    Two formats are read, always with ``torch.load(weights_only=True)`` (no code in the file runs):

    - a Lightning checkpoint of this project (``python main.py fit``, or ``python -m rwkv_clip.convert``): it
      carries the towers' ``class_path``/``init_args``, so the path is all that is needed;
    - an official RWKV-CLIP file (``model_31.pt``, a plain state_dict): every tower setting is read from the
      tensor shapes, and the text tower uses the published pooling these weights were trained with.

    Args:
        checkpoint_path: the checkpoint file.
        image_encoder, text_encoder: the towers, for a model built in Python (its checkpoint cannot say how).
        map_location: where the tensors go.
        with_transforms: return ``(model, preprocess, tokenizer)`` as open_clip users know it: the CLIP eval
            transform at the image tower's size, and the tokenizer with the text tower's context length.
        tokenizer: a tokenizer for the model (``tokenizer.json`` or CLIP merges path, or ``"clip"``); replaces the
            checkpoint's own (official files with CLIP's 49408-token vocabulary get ``"clip"``).
        allowed_classes: tower classes outside ``rwkv_clip.backbones`` that the checkpoint may build. Nothing else
            is imported.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    source = str(checkpoint_path)
    if is_official_state_dict(checkpoint):
        if tokenizer is None:  # the released models use CLIP's BPE; other vocabularies need theirs given
            emb = next((v for k, v in checkpoint.items() if k.endswith("text_model.emb.weight")), None)
            tokenizer = "clip" if emb is not None and emb.shape[0] == CLIP_VOCAB_SIZE else None
        checkpoint = official_to_checkpoint(checkpoint, tokenizer)
    elif not (isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping)):
        raise _neither_format(checkpoint_path, checkpoint)
    model = model_from_checkpoint(checkpoint, source, image_encoder, text_encoder, allowed_classes, tokenizer)
    model = model.to(map_location)
    if with_transforms:
        return model, model.get_preprocess(), model.get_tokenizer()
    return model
