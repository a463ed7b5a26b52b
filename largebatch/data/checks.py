"""What is checked about the data before step 1, so that a bad label or file stops the run
at once instead of after an epoch, and nothing unreadable is silently replaced."""
from __future__ import annotations

import numpy as np

from .. import dist
from ..config import ConfigError
from .folder import ImageSet, UnreadableImage
from .sampler import BatchSpec


def same_classes(train: list[str], val: list[str], where: str) -> None:
    """Labels are class indices in sorted-name order: two splits with different class
    names would score every prediction against the wrong class."""
    if train != val:
        differ = sorted(set(train) ^ set(val))
        raise ConfigError(f"{where}: the train and val splits have different classes "
                          f"({', '.join(differ[:5])}); make their class folders agree")


class Subset:
    """A dataset without some of its samples (the unreadable validation files)."""

    def __init__(self, dataset, keep: list[int], skipped: list[str]):
        self.dataset, self.keep, self.skipped_files = dataset, keep, skipped

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, spec: BatchSpec):
        return self.dataset[BatchSpec(tuple(self.keep[i] for i in spec.indices), spec.epoch, spec.augment)]

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def labels_in_range(dataset, where: str) -> None:
    labels = np.asarray(dataset.labels)
    if labels.size and (labels.min() < 0 or labels.max() >= dataset.num_classes):
        bad = int(labels.max() if labels.max() >= dataset.num_classes else labels.min())
        raise ConfigError(f"data.path: {where} holds label {bad}, outside its {dataset.num_classes} classes "
                          f"(0-{dataset.num_classes - 1}); the data is damaged or inconsistent")


def every_class_readable(dataset: ImageSet, where: str) -> None:
    """Each training class has at least one file that decodes: a class whose files are all
    unreadable would otherwise train silently as if it did not exist."""
    labels = np.asarray(dataset.labels)
    for c, name in enumerate(dataset.class_names):
        members = np.flatnonzero(labels == c)
        if not any(dataset.unreadable(int(k)) is None for k in members):
            raise ConfigError(f"data.path: no file of class {name!r} in {where} can be read "
                              f"({len(members)} files); fix or remove that class folder")


def readable_validation(dataset: ImageSet, strict: bool):
    """Every validation file is decoded once, split across the processes. Under
    data.strict an unreadable one is an error; otherwise it is left out of evaluation
    (never replaced by another sample) and named in the run's report."""
    info = dist.info()
    n = len(dataset)
    mine = range(info.rank * n // info.world_size, (info.rank + 1) * n // info.world_size)
    bad = dist.gather_union({(k, why) for k in mine if (why := dataset.unreadable(k)) is not None})
    if not bad:
        return dataset
    if strict:
        raise UnreadableImage(f"validation: {bad[0][1]} ({len(bad)} unreadable validation files; data.strict is "
                              f"on, without --strict they are left out of evaluation and reported)")
    if len(bad) == n:
        raise ConfigError("data.path: no validation image can be read")
    drop = {k for k, _ in bad}
    return Subset(dataset, [k for k in range(n) if k not in drop], [dataset.name(k) for k, _ in bad])
