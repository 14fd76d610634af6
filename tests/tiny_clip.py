"""A tiny CLIPModule that knows its own preprocessing and tokenizer, as CLIPModule.get_preprocess() and
get_tokenizer() give them for real models; importable by class path (``tiny_clip.TinyCLIPModule``)."""

import torch

from rwkv_clip.module import CLIPModule
from tiny_towers import TinyImageTower, TinyTextTower


class TinyCLIPModule(CLIPModule):
    def __init__(self, width: int = 16):
        super().__init__(TinyImageTower(width), TinyTextTower(width=width), embed_dim=8)

    def get_preprocess(self):
        from rwkv_clip.datamodules.image_text import eval_transform

        return eval_transform(16)

    def get_tokenizer(self):
        def tokenize(texts):
            ids = [[1 + ord(c) % 60 for c in t[:7]] for t in texts]
            return torch.tensor([row + [0] * (7 - len(row)) for row in ids])

        return tokenize
