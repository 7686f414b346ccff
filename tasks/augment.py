"""Training-time augmentation, applied per batch inside the training loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each sample by up to `max_shift` steps each way, filling with the edge values
    (background for centred digits, the held level for a signal): images (N, C, H, W) in H and W,
    sequences (N, C, L) along L. Vectors (N, F) have no axis to shift along and come back as they
    are. One gather for the whole batch, no per-sample loop."""
    if max_shift == 0 or x.ndim not in (3, 4):
        return x
    if x.ndim == 3:
        return _shift_sequences(x, max_shift, generator)
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def _shift_sequences(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    n, c, length = x.shape
    padded = F.pad(x, (max_shift, max_shift), mode="replicate")
    dt = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    steps = (dt[:, None] + torch.arange(length))[:, None, :]
    return padded[torch.arange(n)[:, None, None], torch.arange(c)[None, :, None], steps]
