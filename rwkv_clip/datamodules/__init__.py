"""Data: streaming image-text DataModule, the built-in demo dataset, and the preparation CLI (``prepare``)."""

from rwkv_clip.datamodules.image_text import ImageTextDataModule, ImageTextDataset, eval_transform, train_transform
from rwkv_clip.datamodules.demo import DemoDataModule, ensure_demo_data

__all__ = ["ImageTextDataModule", "ImageTextDataset", "DemoDataModule", "ensure_demo_data", "eval_transform",
           "train_transform"]
