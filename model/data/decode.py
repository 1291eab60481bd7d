"""PNG/JPEG bytes to (N, 32, 32, 3) uint8 pixels, in worker processes when there are many."""

from __future__ import annotations

import io
import itertools
import logging
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.data.arrays import IMAGE_SHAPE, InvalidInputError

# Below this many images a process pool costs more to start than it saves.
_PARALLEL_DECODE_MIN_ROWS = 8192
# Beyond this the decode is memory-bound and more processes only add start-up time.
_MAX_DECODE_WORKERS = 8
_IMAGE_FORMATS = ("PNG", "JPEG")

_log = logging.getLogger(__name__)


def _decode_chunk(start: int, blobs: list[bytes | None]) -> np.ndarray:
    """Decode encoded images to (len(blobs), 32, 32, 3) uint8; `start` numbers the rows in
    error messages. A module-level function so that pool workers can import it."""
    out = np.empty((len(blobs), *IMAGE_SHAPE), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        row = start + i
        if blob is None:
            raise InvalidInputError(f"row {row}: image bytes are missing (null)")
        try:
            # Only the two formats of the layout: fewer parsers see untrusted bytes, and the
            # format probe is shorter (~15% of the decode time of a 32x32 JPEG).
            with Image.open(io.BytesIO(blob), formats=_IMAGE_FORMATS) as im:
                # Checked before decoding, so an oversized image is never expanded in memory.
                if im.size != (32, 32):
                    w, h = im.size
                    raise InvalidInputError(f"row {row}: image is {w}x{h}, expected 32x32")
                rgb = im if im.mode == "RGB" else im.convert("RGB")
                out[i] = np.asarray(rgb)
        except InvalidInputError:
            raise
        except UnidentifiedImageError:
            raise InvalidInputError(f"row {row}: cannot decode image: not a PNG or JPEG image "
                                    f"({len(blob)} bytes starting {blob[:8]!r})") from None
        except Exception as e:
            raise InvalidInputError(f"row {row}: cannot decode image: {e}") from e
    return out


def _decode_workers(rows: int) -> int:
    if rows < _PARALLEL_DECODE_MIN_ROWS or multiprocessing.current_process().daemon:
        return 1  # daemonic processes (some task runners) may not start children
    # Spawned workers re-import the main module; one read from stdin cannot be re-imported.
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.exists(main_file):
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_DECODE_WORKERS, rows // (_PARALLEL_DECODE_MIN_ROWS // 2)))


def decode_images(blobs: list[bytes | None]) -> np.ndarray:
    """(N, 32, 32, 3) uint8 from PNG/JPEG bytes, in worker processes when there are many."""
    workers = _decode_workers(len(blobs))
    if workers == 1:
        return _decode_chunk(0, blobs)
    out = np.empty((len(blobs), *IMAGE_SHAPE), dtype=np.uint8)
    bounds = np.linspace(0, len(blobs), workers * 4 + 1).astype(int).tolist()
    # spawn, not fork: forking a process that runs pyarrow or torch thread pools can deadlock.
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            try:
                futures = [(a, pool.submit(_decode_chunk, a, blobs[a:b]))
                           for a, b in itertools.pairwise(bounds) if b > a]
                for a, future in futures:
                    chunk = future.result()
                    out[a : a + len(chunk)] = chunk
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    except BrokenProcessPool as e:
        _log.warning("the image decode pool failed (%s); decoding in this process instead", e)
        return _decode_chunk(0, blobs)
    return out
