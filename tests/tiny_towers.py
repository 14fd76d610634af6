"""Small, fast towers for tests of the training logic (the real towers have their own tests)."""

import torch
from torch import nn

from rwkv_clip.backbones.utils import padding_mask


class TinyImageTower(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width
        self.conv = nn.Conv2d(3, width, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(images).flatten(2).mean(-1))


class TinyTextTower(nn.Module):
    def __init__(self, vocab_size: int = 64, width: int = 16, pad_id: int = 0):
        super().__init__()
        self.width, self.pad_id = width, pad_id
        self.emb = nn.Embedding(vocab_size, width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = padding_mask(tokens, self.pad_id).unsqueeze(-1).float()
        x = self.mlp(self.emb(tokens))
        return (x * mask).sum(1) / mask.sum(1)


def fixed_batch(n: int = 8, seed: int = 0, vocab_size: int = 64, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g)
    tokens = torch.randint(1, vocab_size, (n, length), generator=g)
    tokens[:, length // 2 :] = 0  # right padding
    return images, tokens
