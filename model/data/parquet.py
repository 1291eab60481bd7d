"""Parquet sources in the Hugging Face layout: `img` (PNG/JPEG bytes) and `label`.

Parquet compresses and dictionary-encodes, so a file's size says little about what reading
it costs. Each cap below is checked from the footer and page headers before any data is
read, or on each batch as it streams in, never after the whole file is in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from model.data.arrays import CLASSES, InvalidInputError, RawData, check_label_range, class_names
from model.data.decode import decode_images
from model.data.parquet_pages import PageError, largest_entry, page_sizes

# Rows: 20x CIFAR-10's training set (2.9 GiB of decoded pixels).
MAX_ROWS = 1_000_000
# A 32x32 photo takes ~1 KB as JPEG (940 B in the shared copy) and more as PNG; a file that
# declares more than one row per MIN_ROW_BYTES of its size holds rows without images, or one
# image repeated through a dictionary. Smaller files may hold ROWS_FLOOR rows whatever their
# size, so that decoding any file costs at most 12x its size plus 48 MiB of pixels.
MIN_ROW_BYTES = 256
ROWS_FLOOR = 16_384
# Image bytes as Arrow hands them over: PNG and JPEG do not compress further, so a genuine
# file holds about its own size of them; a compressed page of zeros or a dictionary entry
# named by every row holds far more.
ENCODED_BYTES_PER_FILE_BYTE = 4
ENCODED_BYTES_FLOOR = 8 * 2**20
# One encoded image: a 32x32 PNG or JPEG is a few KB even with metadata chunks.
MAX_IMAGE_BYTES = 2**20
# Rows per batch are chosen so that a batch holds at most this much, even where every row
# names the largest dictionary entry; a genuine file reads in batches of thousands of rows.
_BATCH_BYTES = 8 * 2**20
_MAX_BATCH_ROWS = 4096
# The footer is parsed before any cap can apply; a genuine one holds a few dozen entries.
_THRIFT_STRING_LIMIT = 16 * 2**20
_THRIFT_CONTAINER_LIMIT = 2**16


def _parquet_classes(metadata: dict[bytes, bytes] | None, what: str) -> tuple[str, ...]:
    if not metadata:
        return CLASSES
    if b"classes" in metadata:
        text = metadata[b"classes"].decode()
        try:
            names = json.loads(text)
        except json.JSONDecodeError:
            names = text.split(",")
        if isinstance(names, str):
            names = names.split(",")
        if not isinstance(names, list):
            raise InvalidInputError(f"{what}: metadata `classes` is neither a list nor names,comma")
        return class_names(names, f"{what} metadata `classes`")
    if b"huggingface" in metadata:
        try:
            info = json.loads(metadata[b"huggingface"])
            names = info["info"]["features"]["label"]["names"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return CLASSES
        return class_names(names, f"{what} metadata `huggingface`")
    return CLASSES


def _blob_column(schema: Any, source: str) -> str:
    """The path of the column of encoded images, after checking the schema's layout."""
    import pyarrow as pa

    missing = [c for c in ("img", "label") if c not in schema.names]
    if missing:
        raise InvalidInputError(
            f"{source}: missing column(s) {', '.join(f'`{c}`' for c in missing)}; expected the "
            "Hugging Face layout: `img` struct<bytes, path> with PNG/JPEG bytes, `label` int64"
        )
    img_type = schema.field("img").type
    if pa.types.is_struct(img_type):
        if img_type.get_field_index("bytes") < 0:
            raise InvalidInputError(f"{source}: column `img` has no `bytes` field: {img_type}")
        blob_type, path = img_type.field("bytes").type, "img.bytes"
    else:
        blob_type, path = img_type, "img"
    if pa.types.is_dictionary(blob_type):
        blob_type = blob_type.value_type
    if not (pa.types.is_binary(blob_type) or pa.types.is_large_binary(blob_type)):
        raise InvalidInputError(f"{source}: column `{path}` has type {blob_type}, expected "
                                "struct<bytes> or binary")
    if not pa.types.is_integer(schema.field("label").type):
        raise InvalidInputError(f"{source}: column `label` has type {schema.field('label').type}, "
                                "expected integers")
    return path


def _check_rows(metadata: Any, size: int, source: str) -> int:
    rows = metadata.num_rows
    if rows != sum(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)):
        raise InvalidInputError(f"{source}: the footer's row count disagrees with its row groups")
    limit = min(MAX_ROWS, max(ROWS_FLOOR, size // MIN_ROW_BYTES))
    if rows > limit:
        raise InvalidInputError(
            f"{source} declares {rows} rows, more than the limit of {limit} for a {size}-byte "
            f"file (one row per {MIN_ROW_BYTES} bytes, at most {MAX_ROWS}); refused unread"
        )
    return rows


def _batch_rows(path: Path, metadata: Any, blob_path: str, cap: int, source: str) -> int:
    """Rows per batch, once the page headers show the columns decompress within `cap` and
    no dictionary entry is larger than an image may be."""
    leaves = {metadata.schema.column(i).path: i for i in range(metadata.num_columns)}
    try:
        pages = page_sizes(path, metadata, [leaves[blob_path], leaves["label"]])
        if pages.uncompressed > cap:
            raise InvalidInputError(f"{source}: its pages decompress to {pages.uncompressed} "
                                    f"bytes, more than the limit of {cap} for a "
                                    f"{path.stat().st_size}-byte file; refused unread")
        largest = 1
        for page in pages.dictionaries:
            if page.leaf != leaves[blob_path]:
                continue
            entry = largest_entry(path, page)
            if entry is not None and entry > MAX_IMAGE_BYTES:
                raise InvalidInputError(f"{source}: its dictionary holds an image of {entry} "
                                        f"bytes, more than the limit of {MAX_IMAGE_BYTES}; refused "
                                        "unread")
            largest = max(largest, page.uncompressed if entry is None else entry)
    except (PageError, OSError) as e:
        raise InvalidInputError(f"{source}: cannot read the Parquet pages: {e}") from e
    # Every row of a batch may name the largest entry, and Arrow copies it into each.
    return max(1, min(_MAX_BATCH_ROWS, _BATCH_BYTES // largest))


def _lengths(blobs: Any) -> np.ndarray:
    """Byte length of each row's image, without expanding a dictionary into its rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(blobs.type):
        lengths = pc.take(pc.binary_length(blobs.dictionary), blobs.indices)
    else:
        lengths = pc.binary_length(blobs)
    return lengths.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def read_parquet(path: Path, source: str) -> RawData:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, thrift_string_size_limit=_THRIFT_STRING_LIMIT,
                            thrift_container_size_limit=_THRIFT_CONTAINER_LIMIT)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise InvalidInputError(f"{source} is not a Parquet file: {e}") from e
    blob_path = _blob_column(schema, source)
    classes = _parquet_classes(pf.metadata.metadata, source)
    size = path.stat().st_size
    declared = _check_rows(pf.metadata, size, source)
    cap = max(ENCODED_BYTES_FLOOR, ENCODED_BYTES_PER_FILE_BYTE * size)
    batch_rows = _batch_rows(path, pf.metadata, blob_path, cap, source)
    blobs: list[bytes | None] = []
    labels: list[np.ndarray] = []
    total = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[blob_path, "label"]):
            row = len(blobs)
            if row + len(batch) > declared:
                raise InvalidInputError(f"{source} holds more rows than its footer declares")
            label_col = batch.column("label")
            if label_col.null_count:
                first = int(np.flatnonzero(label_col.is_null().to_numpy(zero_copy_only=False))[0])
                raise InvalidInputError(f"{source}: row {row + first}: label is missing (null)")
            labels.append(label_col.to_numpy().astype(np.int64))
            img = batch.column("img")
            col = pc.struct_field(img, "bytes") if blob_path == "img.bytes" else img
            lengths = _lengths(col)
            if lengths.size and lengths.max() > MAX_IMAGE_BYTES:
                first = int(np.argmax(lengths > MAX_IMAGE_BYTES))
                raise InvalidInputError(f"{source}: row {row + first}: the image is "
                                        f"{int(lengths[first])} bytes, more than the limit of "
                                        f"{MAX_IMAGE_BYTES}")
            total += int(lengths.sum())
            if total > cap:
                raise InvalidInputError(f"{source}: its images take more than {cap} bytes, the "
                                        f"limit for a {size}-byte file; refused after "
                                        f"{row + len(batch)} rows")
            blobs.extend(col.to_pylist())
            del batch, img, col  # before the next batch is built, not after
    except (pa.ArrowException, OSError) as e:
        raise InvalidInputError(f"{source}: cannot read the Parquet data: {e}") from e
    if not blobs:
        raise InvalidInputError(f"{source} holds no rows")
    label_array = np.concatenate(labels)
    check_label_range(label_array, len(classes), source)
    return RawData.of(decode_images(blobs), label_array, None, None, classes)
