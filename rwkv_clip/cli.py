"""The LightningCLI behind main.py."""

import sys

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from rwkv_clip.module import CLIPModule


class CLIPCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        # `--ckpt_path` supplies the model when the config has none: LightningCLI reads a checkpoint's
        # hyperparameters over the model config anyway, but its parser first insists on one.
        from rwkv_clip.inference import model_config_from_args

        model = model_config_from_args(sys.argv[1:] if args is None else args)
        if model is not None:
            parser.set_defaults({f"{name}.model": model for name in self.subcommands()})
        super().parse_arguments(parser, args)


def main(args=None, run: bool = True) -> LightningCLI:
    """Subclass mode for model and data, so YAML picks both by ``class_path``; each run directory gets the
    resolved ``config.yaml`` beside its TensorBoard events."""
    return CLIPCLI(
        CLIPModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
