"""The report's per-image torchvision pipeline on PIL images, kept exactly as published for
the `reference` recipe's DataLoader, and the report's normalization constants."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def reference_transform(train: bool) -> Any:
    """A PIL image in, a normalized (3, 32, 32) float tensor out."""
    # Imported here so the batched GPU path never pays for torchvision's import.
    from torchvision import transforms as T

    to_normalized = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    if not train:
        return T.Compose(to_normalized)
    return T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1),
            T.RandomRotation(20),
            T.RandomAffine(0, translate=(0.1, 0.1)),
            *to_normalized,
        ]
    )


class PILDataset(Dataset):
    """uint8 (N, H, W, 3) RGB images and labels served as (transform(PIL image), int label).

    Holds only arrays and the transform, so it pickles into DataLoader worker processes.
    """

    def __init__(self, images_uint8_nhwc: np.ndarray, labels: np.ndarray, transform: Any) -> None:
        images = np.asarray(images_uint8_nhwc)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} "
                             f"{images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},) to match the images, "
                             f"got {labels.shape}")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
