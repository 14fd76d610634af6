"""Load a trained model for inference."""

import importlib
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from rwkv_clip.module import CLIPModule


def _build(spec: dict, what: str) -> nn.Module:
    """Instantiate ``{"class_path": "pkg.mod.Class", "init_args": {...}}`` by import, never by eval."""
    class_path = spec.get("class_path", "")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import the {what} class {class_path!r} named in the checkpoint: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"the {what} class {class_path!r} named in the checkpoint is not a torch.nn.Module")
    return cls(**spec.get("init_args", {}))


def load_model(
    checkpoint_path: Union[str, Path],
    image_encoder: Optional[nn.Module] = None,
    text_encoder: Optional[nn.Module] = None,
    map_location: Union[str, torch.device] = "cpu",
) -> CLIPModule:
    """A :class:`CLIPModule` in eval mode with the weights of a Lightning checkpoint.

    Checkpoints written by ``python main.py fit`` carry the towers' ``class_path``/``init_args``, so the path
    is all that is needed. For a model built in Python, pass the two towers as they were built.
    The file is read with ``torch.load(weights_only=True)``: no code in it is run.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint of a CLIPModule (it has no 'state_dict')")
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    towers = {"image_encoder": image_encoder, "text_encoder": text_encoder}
    for name, given in towers.items():
        spec = hparams.pop(name, None)
        if given is None:
            if not isinstance(spec, dict):
                raise ValueError(
                    f"{str(path)!r} does not say how to build its {name} (the model was built in Python, not by "
                    f"main.py): pass {name}=... to load_model"
                )
            towers[name] = _build(spec, name)
    model = CLIPModule(**towers, **hparams)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
