"""The shapes every source is normalised to, their digest, and the one error type.

Every array leaves the package as (N, 32, 32, 3) uint8 RGB with int64 labels; the checks
here are shared by the sources, the decode cache and the splits.
"""

from __future__ import annotations

import functools
import hashlib
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.errors import UserError

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
)
IMAGE_SHAPE = (32, 32, 3)
# Error messages quote at most this much of whatever a file holds.
_QUOTE_CHARS = 200


class InvalidInputError(UserError, ValueError):
    """Any problem with a data source or competition file; the message says what is wrong
    and, where possible, how to fix it."""


def clip(text: str) -> str:
    """One line of at most _QUOTE_CHARS characters, for quoting a file's content in errors."""
    text = " ".join(text.split())
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 3] + "..."


def quote(value: Any) -> str:
    """repr() of a value read from a file, short whatever the value's size."""
    if isinstance(value, str | bytes | bytearray) and len(value) > _QUOTE_CHARS:
        return f"{value[:_QUOTE_CHARS]!r}... ({len(value)} long)"
    try:
        return clip(reprlib.repr(value))
    except Exception:  # an int past str()'s digit limit, say
        return f"<{type(value).__name__}>"


class SourceUnavailableError(InvalidInputError):
    """The data source could not be reached or read in transit (a network error, a
    throttled or restarting endpoint): retrying may help, unlike any other input error."""


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 hex over a small header (shape, dtype), the pixel bytes and the int64 label bytes."""
    images = np.ascontiguousarray(images)
    labels = np.ascontiguousarray(labels, dtype="<i8")
    h = hashlib.sha256()
    # The header keeps (2, 32, 32, 3) and (4, 16, 32, 3) of the same bytes apart.
    h.update(f"cifar-content-v1 {images.shape} {images.dtype.str} {labels.shape}\n".encode())
    h.update(images.reshape(-1).view(np.uint8))
    h.update(labels.view(np.uint8))
    return h.hexdigest()


def source_digest(train_images: np.ndarray, train_labels: np.ndarray,
                  test_images: np.ndarray | None, test_labels: np.ndarray | None) -> str:
    train = content_digest(train_images, train_labels)
    if test_images is None or test_labels is None:
        # A train-only source is digested exactly like a Split of the same rows.
        return train
    test = content_digest(test_images, test_labels)
    return hashlib.sha256(f"cifar-source-v1\ntrain {train}\ntest {test}\n".encode()).hexdigest()


def check_arrays(images: np.ndarray, labels: np.ndarray, what: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise InvalidInputError(f"{what}: images must be a uint8 numpy array")
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise InvalidInputError(
            f"{what}: images have shape {images.shape}, expected (N, 32, 32, 3)"
        )
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.ndim != 1:
        raise InvalidInputError(f"{what}: labels must be a 1-D int64 numpy array")
    if len(labels) != len(images):
        raise InvalidInputError(f"{what}: {len(images)} images but {len(labels)} labels")


def check_label_range(labels: np.ndarray, num_classes: int, what: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        row = int(bad[0])
        raise InvalidInputError(f"{what}: row {row}: label {int(labels[row])} is outside "
                                f"0..{num_classes - 1} ({len(bad)} such row(s))")


def class_names(names: Sequence[str], what: str) -> tuple[str, ...]:
    if len(names) != len(CLASSES):
        shown = ", ".join(str(n).strip() for n in names[: 2 * len(CLASSES)])
        raise InvalidInputError(
            f"{what}: {len(names)} class names ({clip(shown)}); CIFAR-10 has 10"
        )
    return tuple(str(n).strip() for n in names)


@dataclass(frozen=True, eq=False)
class Split:
    """Rows of one split; `eq=False` because element-wise array equality has no truth value."""

    images: np.ndarray  # (N, 32, 32, 3) uint8 RGB, C-contiguous
    labels: np.ndarray  # (N,) int64 in 0..9

    def __post_init__(self) -> None:
        check_arrays(self.images, self.labels, "Split")
        if not self.images.flags.c_contiguous:
            object.__setattr__(self, "images", np.ascontiguousarray(self.images))

    def __len__(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def digest(self) -> str:
        return content_digest(self.images, self.labels)


@dataclass(frozen=True, eq=False)
class RawData:
    """A source as read, before any validation split."""

    train_images: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray | None  # (M, 32, 32, 3) uint8, for sources with an official test
    test_labels: np.ndarray | None
    classes: tuple[str, ...]
    digest: str

    @classmethod
    def of(cls, train_images: np.ndarray, train_labels: np.ndarray,
           test_images: np.ndarray | None, test_labels: np.ndarray | None,
           classes: tuple[str, ...]) -> RawData:
        """Digested here, so that no source can hand out arrays under another's digest."""
        digest = source_digest(train_images, train_labels, test_images, test_labels)
        return cls(train_images, train_labels, test_images, test_labels, classes, digest)
