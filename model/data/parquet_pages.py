"""What a Parquet column chunk will decompress to, read from its page headers before any of
its data is read.

The footer's sizes are only claims: Arrow sizes each page's buffer by the page's own header,
and decodes a dictionary-encoded column by copying a dictionary entry into every row that
names it. So a file of a few hundred bytes can make it decompress gigabytes (a compressed
page of zeros) or materialise gigabytes (one large dictionary entry named by every row). The
headers are small Thrift structs ahead of each page; this walks them the way Arrow will,
from the chunk's first page until it has seen the chunk's values, and sums what they say.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

# Page types (parquet.thrift)
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
# Arrow refuses larger page headers itself; genuine ones are tens of bytes (a few KB with
# statistics that quote binary values).
_MAX_HEADER_BYTES = 16 * 2**20
_FIRST_READ = 4096
_MAX_NESTING = 16
# Parquet's codec names, as pyarrow.decompress knows them (not the legacy LZ4 nor LZO).
_CODECS = {"SNAPPY": "snappy", "GZIP": "gzip", "BROTLI": "brotli", "ZSTD": "zstd",
           "LZ4_RAW": "lz4_raw"}


class PageError(ValueError):
    """The page headers cannot be read the way a Parquet reader reads them."""


class _Short(Exception):
    """The header runs past the bytes read so far."""


@dataclass(frozen=True)
class DictionaryPage:
    leaf: int  # the column's index among the file's leaf columns
    offset: int  # of the page's data, just past its header
    compressed: int  # bytes
    uncompressed: int  # bytes
    entries: int
    codec: str  # as the footer names it: SNAPPY, ZSTD, ...


@dataclass(frozen=True)
class PageSizes:
    uncompressed: int  # bytes, over every page of the chunks walked
    dictionaries: tuple[DictionaryPage, ...]


class _Compact:
    """The Thrift compact protocol, read only as far as a page header needs: integers and
    nested structs are kept, everything else is skipped."""

    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise _Short
        self.pos += 1
        return self.buf[self.pos - 1]

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise _Short
        self.pos += n

    def varint(self) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise PageError("a page header holds an over-long integer")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def struct(self, depth: int = 0) -> dict[int, Any]:
        if depth > _MAX_NESTING:
            raise PageError("a page header is nested too deeply")
        fields: dict[int, Any] = {}
        last = 0
        while True:
            head = self.byte()
            kind = head & 0x0F
            if kind == 0:
                return fields
            last = last + (head >> 4) if head >> 4 else self.zigzag()
            fields[last] = self.value(kind, depth)

    def value(self, kind: int, depth: int) -> Any:
        if kind in (1, 2):  # bool, in the field header itself
            return kind == 1
        if kind == 3:
            return self.byte()
        if kind in (4, 5, 6):
            return self.zigzag()
        if kind == 7:
            return self.skip(8)
        if kind == 8:
            return self.skip(self.varint())
        if kind in (9, 10):  # list, set
            head = self.byte()
            n = head >> 4 if head >> 4 != 15 else self.varint()
            for _ in range(n):
                self.element(head & 0x0F, depth)
            return None
        if kind == 11:  # map
            n = self.varint()
            types = self.byte() if n else 0
            for _ in range(n):
                self.element(types >> 4, depth)
                self.element(types & 0x0F, depth)
            return None
        if kind == 12:
            return self.struct(depth + 1)
        raise PageError(f"a page header holds an unknown Thrift type {kind}")

    def element(self, kind: int, depth: int) -> None:
        if kind in (1, 2):  # a bool inside a collection takes a byte of its own
            self.skip(1)
        else:
            self.value(kind, depth)


def _read_header(f: BinaryIO, pos: int) -> tuple[dict[int, Any], int]:
    """(fields, length) of the page header at `pos`."""
    want = _FIRST_READ
    while True:
        f.seek(pos)
        buf = f.read(want)
        reader = _Compact(buf)
        try:
            return reader.struct(), reader.pos
        except _Short:
            if len(buf) < want or want >= _MAX_HEADER_BYTES:
                raise PageError(f"the page header at byte {pos} is truncated") from None
            want *= 4


def _size(header: dict[int, Any], field: int, pos: int) -> int:
    value = header.get(field)
    if type(value) is not int or value < 0:
        raise PageError(f"the page header at byte {pos} has no valid size")
    return value


def _values(header: dict[int, Any]) -> int:
    for field in (5, 8):  # data_page_header, data_page_header_v2: num_values is field 1
        sub = header.get(field)
        if isinstance(sub, dict) and type(sub.get(1)) is int:
            return max(sub[1], 0)
    return 0


def page_sizes(path: Path, metadata: Any, leaves: list[int]) -> PageSizes:
    """Sum the page headers of the leaf columns `leaves` in every row group of `metadata`
    (a pyarrow FileMetaData). Raises PageError where a reader could not walk them either."""
    total = 0
    dictionaries = []
    with path.open("rb") as f:
        for group in range(metadata.num_row_groups):
            for leaf in leaves:
                chunk = metadata.row_group(group).column(leaf)
                # Where Arrow starts: the dictionary page when the footer places it first.
                pos = chunk.data_page_offset
                if chunk.has_dictionary_page and 0 < chunk.dictionary_page_offset < pos:
                    pos = chunk.dictionary_page_offset
                end, seen = pos + chunk.total_compressed_size, 0
                while seen < chunk.num_values and pos < end:
                    header, length = _read_header(f, pos)
                    uncompressed = _size(header, 2, pos)
                    total += uncompressed
                    if header.get(1) == _DICTIONARY_PAGE:
                        sub = header.get(7)
                        entries = sub.get(1) if isinstance(sub, dict) else None
                        # A writer puts only values the chunk uses in its dictionary.
                        if type(entries) is not int or not 0 <= entries <= chunk.num_values:
                            raise PageError(f"the dictionary page at byte {pos} is malformed")
                        dictionaries.append(DictionaryPage(
                            leaf, pos + length, _size(header, 3, pos), uncompressed, entries,
                            chunk.compression))
                    elif header.get(1) in (_DATA_PAGE, _DATA_PAGE_V2):
                        seen += _values(header)
                    pos += length + _size(header, 3, pos)
    return PageSizes(total, tuple(dictionaries))


def largest_entry(path: Path, page: DictionaryPage) -> int | None:
    """The longest value of a BYTE_ARRAY dictionary page, read and decompressed (its size
    is known, so this is bounded); None where pyarrow does not expose the page's codec."""
    import pyarrow as pa

    codec = _CODECS.get(page.codec)
    if codec is None and page.codec != "UNCOMPRESSED":
        return None
    with path.open("rb") as f:
        f.seek(page.offset)
        data = f.read(page.compressed)
    if len(data) < page.compressed:
        raise PageError(f"the dictionary page at byte {page.offset} is truncated")
    if codec is not None:
        try:
            data = pa.decompress(data, page.uncompressed, codec=codec, asbytes=True)
        except (pa.ArrowException, ValueError) as e:
            raise PageError(
                f"cannot decompress the dictionary page at byte {page.offset}: {e}"
            ) from e
    largest = pos = 0
    for _ in range(page.entries):  # PLAIN: a 4-byte little-endian length, then the bytes
        n = int.from_bytes(data[pos : pos + 4], "little")
        pos += 4 + n
        if pos > len(data):
            raise PageError(f"the dictionary page at byte {page.offset} ends inside a value")
        largest = max(largest, n)
    return largest
