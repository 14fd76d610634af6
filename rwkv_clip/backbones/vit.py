"""Vision Transformer image tower from timm, for the RWKV-vs-Transformer ablations.

Any timm ViT by name, randomly initialised, or with weights from a local file. Nothing is ever
downloaded: this project does not reach the hub, so ``pretrained=True`` is refused with directions.
"""

from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
from torch import nn

# Wrappers that checkpoints commonly put around a ViT's own keys (DDP, our TimmViT, CLIPModule, open_clip).
_KEY_PREFIXES = ("module.", "image_encoder.", "model.", "visual.trunk.", "trunk.")
# Classifier heads are dropped: the tower returns pooled features, so a head's shape never matters.
_HEAD_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.")


class TimmViT(nn.Module):
    """A timm Vision Transformer returning timm's own pooled features ``(B, width)``.

    Args:
        model_name: any timm ViT name, e.g. ``vit_base_patch32_224`` or ``vit_base_patch16_224``.
        img_size: training resolution; other resolutions still work (``dynamic_img_size``).
        pretrained_path: local weights file (a state dict, or a dict holding one under ``state_dict`` / ``model``).
            A classifier head in it is ignored and the position embedding is resampled if its grid differs.
        pretrained: hub weights; not supported here (raises) — download them elsewhere and pass ``pretrained_path``.
        drop_path_rate: stochastic depth rate (timm's linear schedule over the blocks).
        grad_checkpointing: recompute block activations in the backward pass to save memory.
        patch_size, embed_dim, depth, num_heads, mlp_ratio: override the named model's architecture
            (e.g. a demo-sized ViT); ``None`` keeps the named model's value.
        global_pool: override timm's pooling (``"token"``, ``"avg"``, ...); ``None`` keeps the model's default.
        dynamic_img_size: let timm resample the position embedding on the fly for other input sizes.
        model_kwargs: any further keyword arguments for ``timm.create_model``.
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch32_224",
        img_size: int = 224,
        pretrained_path: Optional[str] = None,
        pretrained: bool = False,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        patch_size: Optional[int] = None,
        embed_dim: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        mlp_ratio: Optional[float] = None,
        global_pool: Optional[str] = None,
        dynamic_img_size: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        if pretrained:
            raise ValueError(
                f"TimmViT(pretrained=True): hub downloads are not supported. Download the weights for "
                f"{model_name!r} elsewhere (e.g. `timm.create_model({model_name!r}, pretrained=True)` on a machine "
                f"with internet, then `torch.save(model.state_dict(), 'vit.pth')`) and pass pretrained_path='vit.pth'."
            )
        if not timm.is_model(model_name):
            raise ValueError(
                f"TimmViT: unknown timm model_name {model_name!r}; see timm.list_models('vit_*') for the choices."
            )
        kwargs: Dict[str, Any] = dict(model_kwargs or {})
        overrides = dict(
            patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, global_pool=global_pool,
        )
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        try:
            # num_classes=0: no classifier; pretrained=False: never touch the network.
            self.model = timm.create_model(
                model_name, pretrained=False, num_classes=0, img_size=img_size,
                drop_path_rate=drop_path_rate, dynamic_img_size=dynamic_img_size, **kwargs,
            )
        except TypeError as e:
            raise ValueError(
                f"TimmViT: timm model {model_name!r} does not accept these arguments ({e}); "
                f"TimmViT needs a timm Vision Transformer (e.g. vit_base_patch32_224)."
            ) from e
        for attr in ("forward_features", "forward_head", "num_features"):
            if not hasattr(self.model, attr):
                raise ValueError(f"TimmViT: timm model {model_name!r} has no {attr!r}; use a timm Vision Transformer.")
        self.model_name = model_name
        self.img_size = img_size
        self.width: int = int(getattr(self.model, "head_hidden_size", self.model.num_features))
        self.patch_size = self.model.patch_embed.patch_size if hasattr(self.model, "patch_embed") else None
        if pretrained_path is not None:
            self.load_pretrained(pretrained_path)
        self.set_grad_checkpointing(grad_checkpointing)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that get no weight decay (timm's convention): the position embedding and the
        learned class / distillation / register tokens."""
        own = {n.removeprefix("model.") for n, _ in self.named_parameters()}
        names = set(self.model.no_weight_decay()) | {"pos_embed", "cls_token", "dist_token", "reg_token"}
        return {f"model.{n}" for n in names if n in own}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass instead of keeping them (timm's own switch)."""
        self.grad_checkpointing = enable
        self.model.set_grad_checkpointing(enable)

    @torch.no_grad()
    def load_pretrained(self, path: str) -> None:
        """Load ViT weights from a local file; drop any classifier head and resample the position embedding."""
        if not Path(path).is_file():
            raise ValueError(f"TimmViT: pretrained_path {path!r} does not exist or is not a file.")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = ckpt
        for key in ("state_dict", "model"):  # Lightning / timm-train / DeiT style wrappers
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(
                f"TimmViT: {path!r} does not hold a state dict (a dict of tensors, possibly under 'state_dict' or 'model')."
            )
        own = self.model.state_dict()
        # Strip wrapper prefixes while that makes the keys match the model better.
        changed = True
        while changed:
            changed = False
            for prefix in _KEY_PREFIXES:
                stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                if len(set(stripped) & set(own)) > len(set(state) & set(own)):
                    state, changed = stripped, True
        state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}

        pos, target = state.get("pos_embed"), own.get("pos_embed")
        # Same width, different grid (another img_size or patch count): resample instead of failing.
        if pos is not None and target is not None and pos.shape != target.shape and pos.shape[-1] == target.shape[-1]:
            state["pos_embed"] = self._resample_pos_embed(state["pos_embed"], own["pos_embed"], path)

        mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
        if mismatched:
            details = ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:5])
            raise ValueError(
                f"TimmViT: weights in {path!r} do not fit {self.model_name!r} ({details}); "
                f"check model_name / patch_size / embed_dim match the checkpoint."
            )
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"TimmViT: weights in {path!r} do not match {self.model_name!r}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
            )

    def _resample_pos_embed(self, pos: torch.Tensor, target: torch.Tensor, path: str) -> torch.Tensor:
        from timm.layers import resample_abs_pos_embed

        # Prefix (class / register) tokens carry position entries unless the model adds them after the embedding.
        n_prefix = 0 if getattr(self.model, "no_embed_class", False) else int(getattr(self.model, "num_prefix_tokens", 1))
        old_grid = int(round((pos.shape[1] - n_prefix) ** 0.5))
        if pos.dim() != 3 or old_grid * old_grid != pos.shape[1] - n_prefix:
            raise ValueError(
                f"TimmViT: position embedding in {path!r} has shape {tuple(pos.shape)}, which cannot be resampled "
                f"to {tuple(target.shape)}; check model_name / embed_dim match the checkpoint."
            )
        new_grid = list(self.model.patch_embed.grid_size)
        return resample_abs_pos_embed(pos, new_size=new_grid, old_size=[old_grid, old_grid], num_prefix_tokens=n_prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"TimmViT expects float images (B, 3, H, W), got {tuple(x.shape)} {x.dtype}")
        if self.patch_size is not None and (x.shape[2] % self.patch_size[0] or x.shape[3] % self.patch_size[1]):
            raise ValueError(
                f"TimmViT: image size {tuple(x.shape[2:])} is not a multiple of the patch size {tuple(self.patch_size)}"
            )
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
