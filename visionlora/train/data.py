"""Image folders, their transforms, and a batch order that a resumed run can reproduce exactly."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, Subset

from visionlora._deps import require
from visionlora.errors import ConfigError
from visionlora.train.recipe import ClassifierData

__all__ = ["EpochBatches", "class_weights", "classifier_datasets", "mix_seed", "set_epoch", "targets_of"]


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several non-negative integers (a seed, an epoch, an index)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (1 << 63)
    return value


class EpochBatches(Sampler[list[int]]):
    """Shuffled batches whose order depends only on (seed, epoch); ``start`` skips batches already done.

    Every process builds the same order; accelerate splits each batch between processes, so the
    global batch is the same with 1 or N processes. With ``weights`` (one per sample) each epoch
    draws ``size`` samples with replacement in proportion to them instead of a permutation. With
    ``groups`` (one per sample, e.g. an aspect-ratio bucket) every batch holds one group: each
    group is shuffled and cut into batches (its last one may be short), and the batches shuffled.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        drop_last: bool = False,
        weights: Sequence[float] | None = None,
        groups: Sequence[int] | None = None,
    ) -> None:
        self.size, self.batch_size, self.seed, self.drop_last = size, batch_size, seed, drop_last
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        self.groups = None if groups is None else list(groups)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Make the next iteration epoch ``epoch``, starting after its first ``start`` batches."""
        self.epoch, self.start = epoch, start

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        if self.groups is not None:
            grouped: list[list[int]] = []
            for group in sorted(set(self.groups)):
                members = torch.tensor([i for i, g in enumerate(self.groups) if g == group])
                members = members[torch.randperm(len(members), generator=generator)]
                grouped += [b.tolist() for b in members.split(self.batch_size)]
            return [grouped[i] for i in torch.randperm(len(grouped), generator=generator).tolist()]
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        else:
            order = torch.randperm(self.size, generator=generator)
        batches = [b.tolist() for b in order.split(self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()[self.start :]

    def __len__(self) -> int:
        return len(self._batches()) - self.start


def class_weights(labels: Sequence[int]) -> list[float]:
    """Per-sample weights inversely proportional to the size of each sample's class (balanced sampling)."""
    counts = Counter(labels)
    return [1.0 / counts[label] for label in labels]


class _Transformed(Dataset[tuple[torch.Tensor, int]]):
    """Images through ``transform``; with a ``seed``, each (epoch, index) draws its own random numbers.

    Random augmentation then does not depend on the global RNG, on how many batches a loader
    prefetched, on worker processes or on resuming, so a resumed run sees the same images.
    """

    def __init__(self, base: Dataset[Any], transform: Any, seed: int | None = None) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        if self.seed is None:
            return self.transform(image), label
        sample_seed = mix_seed(self.seed, self.epoch, index)
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                random.seed(sample_seed)
                return self.transform(image), label
        finally:
            random.setstate(state)


def set_epoch(dataset: Dataset[Any], epoch: int) -> None:
    """Tell a dataset from :func:`classifier_datasets` which epoch its augmentation is for."""
    if isinstance(dataset, Subset):
        set_epoch(dataset.dataset, epoch)
    elif isinstance(dataset, _Transformed):
        dataset.epoch = epoch


def classifier_datasets(
    data: ClassifierData, transforms: tuple[Any, Any], seed: int
) -> tuple[Dataset[Any], Dataset[Any], list[str]]:
    """(train, val, class names) from ``data.root``: its train/ and val/ folders, or one folder split by
    ``data.val_fraction`` (the same split for the same seed)."""
    ImageFolder = require("torchvision.datasets").ImageFolder
    root = Path(data.root)
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} is not a folder; give an ImageFolder-style folder of class folders")
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train, val = ImageFolder(str(root / "train")), ImageFolder(str(root / "val"))
            if train.classes != val.classes:
                raise ConfigError(f"data.root: {root}/train has classes {train.classes}, val/ has {val.classes}")
            return _Transformed(train, transforms[0], seed), _Transformed(val, transforms[1]), list(train.classes)
        full = ImageFolder(str(root))
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"data.root: {root}: {exc}") from None
    if len(full.classes) < 2:
        raise ConfigError(f"data.root: {root} has {len(full.classes)} class folder(s); a classifier needs 2 or more")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(full) * data.val_fraction))
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    train_set = Subset(_Transformed(full, transforms[0], seed), train_idx)
    val_set = Subset(_Transformed(full, transforms[1]), val_idx)
    return train_set, val_set, list(full.classes)


def targets_of(dataset: Dataset[Any]) -> Sequence[int]:
    """Labels of an image-folder dataset (through Subset and the transform wrapper) without loading images."""
    if isinstance(dataset, Subset):
        labels = targets_of(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    if isinstance(dataset, _Transformed):
        return targets_of(dataset.base)
    return list(dataset.targets)  # type: ignore[attr-defined]
