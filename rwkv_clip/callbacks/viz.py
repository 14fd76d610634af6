"""Pictures for TensorBoard, drawn with PIL only: a retrieval grid and a confusion matrix."""

from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

GREEN, RED, GREY, WHITE, BLACK = (0, 150, 0), (190, 0, 0), (90, 90, 90), (255, 255, 255), (0, 0, 0)


def retrieval_grid(
    images: Sequence[Image.Image],
    ranked_captions: Sequence[Sequence[str]],
    correct: Sequence[Sequence[bool]],
    tile: int = 160,
    columns: int = 4,
) -> np.ndarray:
    """One tile per image: the image, then its top captions; a correct caption is green and marked "[+]"."""
    font = ImageFont.load_default()
    chars = max(12, tile // 6)  # the default bitmap font is ~6 px per character
    blocks = []
    for caps, ok in zip(ranked_captions, correct):
        lines = []
        for r, (c, good) in enumerate(zip(caps, ok)):
            wrapped = textwrap.wrap(f"{r + 1}{' [+]' if good else ''} {c}", chars)[:3] or [""]
            lines += [(w, GREEN if good else RED) for w in wrapped]
        blocks.append(lines)
    text_h = 12 * max(len(b) for b in blocks) + 4
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * tile, rows * (tile + text_h)), WHITE)
    draw = ImageDraw.Draw(canvas)
    for i, (img, lines) in enumerate(zip(images, blocks)):
        x, y = (i % columns) * tile, (i // columns) * (tile + text_h)
        canvas.paste(img.convert("RGB").resize((tile - 4, tile - 4)), (x + 2, y + 2))
        for j, (line, colour) in enumerate(lines):
            draw.text((x + 3, y + tile + 2 + 12 * j), line, fill=colour, font=font)
    return np.asarray(canvas)


def confusion_matrix_image(cm: torch.Tensor, classnames: Sequence[str], cell: int = 0) -> np.ndarray:
    """Row-normalised confusion matrix (rows = true class) as a white-to-blue heat map with labels."""
    n = cm.shape[0]
    cell = cell or max(6, min(40, 640 // max(n, 1)))
    font = ImageFont.load_default()
    labels = [c[:16] for c in classnames] if n <= 40 else [""] * n
    margin = 6 * max([len(s) for s in labels] + [0]) + 8
    rows = cm.float() / cm.sum(dim=1, keepdim=True).clamp(min=1)
    top = 28  # title + a band of column labels
    canvas = Image.new("RGB", (margin + n * cell + 4, top + n * cell + 4), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 2), "true (rows) vs predicted (columns)", fill=BLACK, font=font)
    for i in range(n):
        if labels[i]:
            draw.text((2, top + i * cell + cell // 2 - 5), labels[i], fill=BLACK, font=font)
        for j in range(n):
            v = float(rows[i, j])
            colour = (int(255 * (1 - v)), int(255 * (1 - 0.6 * v)), 255)
            x0, y0 = margin + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=GREY if cell >= 10 else None)
            if cell >= 24 and cm[i, j] > 0:
                draw.text((x0 + 2, y0 + cell // 2 - 5), str(int(cm[i, j])), fill=BLACK if v < 0.5 else WHITE, font=font)
    # column labels: initials along the top band (vertical text is not available with the default font)
    for j in range(n):
        if labels[j] and cell >= 10:
            draw.text((margin + j * cell + 1, top - 12), labels[j][:max(1, cell // 6)], fill=BLACK, font=font)
    return np.asarray(canvas)


def log_image(trainer, tag: str, image: np.ndarray) -> None:
    """Send an HWC uint8 image to every logger that can take one (TensorBoard: ``experiment.add_image``)."""
    if trainer.global_rank != 0:
        return
    for logger in trainer.loggers:
        add = getattr(getattr(logger, "experiment", None), "add_image", None)
        if callable(add):
            add(tag, image, global_step=trainer.global_step, dataformats="HWC")
