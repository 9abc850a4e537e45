"""Per-tensor seeding: a mask depends only on (seed, model name, tensor name).

Hashing the triple (instead of drawing from one global generator) makes masks independent
of processing order, thread count, storage dtype and which other models are in the pool,
while masks of different models stay independent.
"""

from __future__ import annotations

import hashlib

import torch


def tensor_seed(seed: int, model: str, tensor: str) -> int:
    """63-bit seed derived from ``blake2b(seed, model, tensor)``."""
    key = f"{int(seed)}\x00{model}\x00{tensor}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def tensor_generator(seed: int, model: str, tensor: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded by :func:`tensor_seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(tensor_seed(seed, model, tensor))
    return gen
