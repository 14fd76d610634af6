"""The LightningCLI behind main.py."""

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from rwkv_clip.module import CLIPModule


def main(args=None, run: bool = True) -> LightningCLI:
    """Subclass mode for model and data, so YAML picks both by ``class_path``; each run directory gets the
    resolved ``config.yaml`` beside its TensorBoard events."""
    return LightningCLI(
        CLIPModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
