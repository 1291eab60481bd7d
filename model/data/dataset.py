"""The dataset a training run sees: a source's rows with a stratified validation hold-out."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from model.data.arrays import InvalidInputError, Split
from model.data.sources import SharedCache, load_arrays


@dataclass(frozen=True, eq=False)
class Dataset:
    train: Split
    val: Split
    test: Split | None  # the source's official test split, where it has one
    classes: tuple[str, ...]
    digest: str  # of the whole source (all train and test rows) before splitting
    source: str  # as given


def _stratified_pick(labels: np.ndarray, k: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(rest, picked): k rows drawn per class in proportion, largest-remainder rounding."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * k / len(labels)
    quota = np.floor(exact).astype(np.int64)
    short = k - int(quota.sum())
    # Stable sort: equal remainders go to the lower class id, so the result is reproducible.
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:short]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == cls))[:q]
              for cls, q in zip(classes, quota, strict=True)]
    picked = np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.empty(0, np.int64)
    return np.setdiff1d(np.arange(len(labels), dtype=np.int64), picked, assume_unique=True), picked


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): sorted, disjoint, covering all rows, deterministic for a seed,
    each class in val in proportion (see _stratified_pick). val_size=0: an empty val."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InvalidInputError(f"labels must be 1-D, got shape {labels.shape}")
    if isinstance(val_size, bool) or not isinstance(val_size, int | np.integer) or val_size < 0:
        raise InvalidInputError(f"val_size must be a non-negative integer, got {val_size!r}")
    n = len(labels)
    if val_size >= n:
        raise InvalidInputError(f"val_size={val_size} leaves no training rows out of {n}; "
                                "pass a smaller val_size")
    if val_size == 0:
        return np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)
    return _stratified_pick(labels, int(val_size), np.random.default_rng(seed))


def _subset(split: Split, train_size: int, seed: int) -> Split:
    n = len(split)
    if isinstance(train_size, bool) or not isinstance(train_size, int | np.integer):
        raise InvalidInputError(f"train_size must be an integer or None, got {train_size!r}")
    if train_size <= 0 or train_size > n:
        raise InvalidInputError(f"train_size={train_size} is outside 1..{n}, the training rows "
                                "left after the validation hold-out; pass a smaller train_size "
                                "or None for all")
    if train_size == n:
        return split
    # A seed stream of its own, so that the subset does not echo the validation draw.
    _, keep = _stratified_pick(split.labels, int(train_size), np.random.default_rng((seed, 1)))
    return Split(split.images[keep], split.labels[keep])


def load_dataset(
    source: str | os.PathLike[str], *, val_size: int = 5000, seed: int = 0,
    train_size: int | None = None, cache_dir: str | os.PathLike[str] | None = None,
    shared_cache: SharedCache | None = None,
) -> Dataset:
    """Read `source`, hold out a stratified validation split of `val_size` rows, then keep a
    stratified subset of `train_size` of the rest (None: all), so that the subset never
    changes the validation rows."""
    source = os.fspath(source)
    raw = load_arrays(source, cache_dir=cache_dir, shared=shared_cache)
    train_idx, val_idx = stratified_split(raw.train_labels, val_size, seed)
    train = Split(raw.train_images[train_idx], raw.train_labels[train_idx])
    val = Split(raw.train_images[val_idx], raw.train_labels[val_idx])
    if train_size is not None:
        train = _subset(train, train_size, seed)
    has_test = raw.test_images is not None and raw.test_labels is not None
    test = Split(raw.test_images, raw.test_labels) if has_test else None
    return Dataset(train=train, val=val, test=test, classes=raw.classes, digest=raw.digest,
                   source=source)
