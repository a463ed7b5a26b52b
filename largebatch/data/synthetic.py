"""Synthetic images of any shape and class count, for benchmarks: a small fixed pool of
random images is reused so that producing a batch costs next to nothing. Colour images
come as uint8, as the JPEG and shard loaders send them (a quarter of fp32's bytes to
copy to a GPU, normalised on the device: data.model_input); others as fp32, as
Fashion-MNIST's."""
from __future__ import annotations

import torch

from .sampler import BatchSpec, derive_seed

POOL = 64


class Synthetic:
    def __init__(self, num_samples: int, num_classes: int, channels: int, size: int, seed: int):
        g = torch.Generator().manual_seed(derive_seed(seed, 0x5EED))
        if channels == 3:
            self.pool = torch.randint(256, (POOL, channels, size, size), generator=g, dtype=torch.uint8)
        else:
            self.pool = torch.randn(POOL, channels, size, size, generator=g)
        self.labels = torch.randint(num_classes, (num_samples,), generator=g)
        self.channels, self.num_classes = channels, num_classes
        self.class_names = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, spec: BatchSpec) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        idx = torch.tensor(spec.indices, dtype=torch.long)
        return self.pool[idx % POOL], self.labels[idx], []
