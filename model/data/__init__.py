"""CIFAR-10 data: every supported source read into (N, 32, 32, 3) uint8 RGB arrays with
int64 labels, digested, cached and split.

- `arrays`: the normalised shapes, their digest, `Split`, and `InvalidInputError`;
- `dataset`: `load_dataset`, the stratified validation hold-out;
- `sources`: source dispatch and the decode cache, over `cifar` (the official batches, a
  folder or its .tar.gz), `parquet` (the Hugging Face layout, with `parquet_pages` and
  `decode`) and torchvision's download;
- `uri`: bytes behind a local path, file:// or s3:// URI;
- `unpickle`: the restricted unpickler every pickle goes through;
- `competition`: the competition's pickle, scoring input rather than training data.

Reading untrusted files is bounded before the work is done: see each module's caps.
"""

from model.data.arrays import (
    CLASSES,
    InvalidInputError,
    RawData,
    SourceUnavailableError,
    Split,
    content_digest,
)
from model.data.competition import read_competition_pickle, write_competition_pickle
from model.data.dataset import Dataset, load_dataset, stratified_split
from model.data.sources import load_arrays
from model.data.uri import open_uri, read_bytes

__all__ = [
    "CLASSES", "Dataset", "InvalidInputError", "RawData", "SourceUnavailableError", "Split",
    "content_digest", "load_arrays", "load_dataset", "open_uri", "read_bytes",
    "read_competition_pickle", "stratified_split", "write_competition_pickle",
]
