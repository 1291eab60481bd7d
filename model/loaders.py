"""Batches for training: the whole split on the device, or the report's PIL pipeline.

Each epoch's data order and augmentation come from (seed, epoch) alone, so a resumed run
sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterator
from functools import partial

import torch

from model import augment, reference_pipeline
from model.config import TrainConfig
from model.data import Split
from model.predict import to_device_images


def _ignore_ctrl_c(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group; a worker dying of it mid-batch would turn it
    into "DataLoader worker exited unexpectedly". The main process stops its workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % 2**63


class DeviceLoader:
    """The whole split resident on the device as uint8; batches augmented there."""

    def __init__(self, split: Split, device: torch.device, batch_size: int, seed: int,
                 augmenter: Callable[..., torch.Tensor], channels_last: bool):
        self.images = to_device_images(split.images, device)  # (N, 3, 32, 32) uint8
        self.labels = torch.from_numpy(split.labels).to(device)
        self.device, self.batch_size, self.seed = device, batch_size, seed
        self.augmenter, self.channels_last = augmenter, channels_last
        n = len(split)
        # Dropping the ragged last batch keeps shapes static (compile, CUDA graphs) once
        # there is at least one full batch.
        self.drop_last = n >= batch_size
        self.steps_per_epoch = n // batch_size if self.drop_last else 1

    def order(self, epoch: int) -> tuple[torch.Generator, list[torch.Tensor]]:
        """The epoch's generator, and its batches' indices drawn from it."""
        gen = torch.Generator(device=self.device).manual_seed(epoch_seed(self.seed, epoch))
        n = self.images.shape[0]
        order = torch.randperm(n, device=self.device, generator=gen)
        stop = self.steps_per_epoch * self.batch_size if self.drop_last else n
        return gen, [order[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The images at `idx`, augmented (drawing from `generator`) and normalized."""
        x = augment.normalize(self.augmenter(self.images[idx], generator=generator))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[idx]  # (B, 3, 32, 32) float, (B,)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen, batches = self.order(epoch)
        for idx in batches:
            yield self.batch(idx, gen)

    def close(self) -> None:
        pass


class _EpochOrder(torch.utils.data.Sampler):
    """Yields (epoch, index): the DataLoader's workers persist across epochs, so each sample
    carries the epoch its augmentation is seeded from."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        # The order a DataLoader(shuffle=True, generator=gen) draws: its iterator takes one
        # number from the generator for the worker seeds, then the sampler's permutation.
        torch.empty((), dtype=torch.int64).random_(generator=gen)
        for index in torch.randperm(self.n, generator=gen).tolist():
            yield self.epoch, index


class _SeededSamples(torch.utils.data.Dataset):
    """The report's transforms, each sample's draws seeded by (seed, epoch, index): the same
    images whichever and however many workers transform them. They draw from torch's CPU
    generator alone, so seeding only it suffices (`torch.manual_seed` in `fork_rng` took a
    tenth of the transforms' time, slowing the baseline `paper` is compared with)."""

    def __init__(self, dataset: reference_pipeline.PILDataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        torch.default_generator.manual_seed(epoch_seed(self.seed, epoch) ^ (index * 2_654_435_761))
        return self.dataset[index]


class ReferenceLoader:
    """The report's pipeline in its strongest faithful form: PIL transforms per image in
    DataLoader worker processes that persist across epochs, pinned host memory and
    non-blocking copies to the device."""

    def __init__(self, split: Split, device: torch.device, batch_size: int, seed: int,
                 workers: int):
        dataset = reference_pipeline.PILDataset(split.images, split.labels,
                                                reference_pipeline.reference_transform(train=True))
        self.order = _EpochOrder(len(split), seed)
        self.device, self.batch_size = device, batch_size
        self.steps_per_epoch = math.ceil(len(split) / batch_size)
        self.loader = torch.utils.data.DataLoader(
            _SeededSamples(dataset, seed), batch_size=batch_size, sampler=self.order,
            num_workers=workers, persistent_workers=workers > 0,
            pin_memory=device.type == "cuda", worker_init_fn=_ignore_ctrl_c)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.order.epoch = epoch
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def close(self) -> None:
        # Persistent workers end with their iterator; drop it now rather than at exit.
        self.loader._iterator = None


def make_loader(config: TrainConfig, split: Split, device: torch.device):
    if config.recipe == "reference":
        return ReferenceLoader(split, device, config.batch_size, config.seed, config.workers)
    augmenter = (augment.report_augment if config.recipe == "paper"
                 else partial(augment.crop_flip, cutout_size=config.cutout))
    return DeviceLoader(split, device, config.batch_size, config.seed, augmenter,
                        config.channels_last)
