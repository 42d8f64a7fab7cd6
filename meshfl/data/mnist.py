"""MNIST from the standard IDX files: find them, download them if allowed, parse with numpy.

Parsing is np.frombuffer over the (gunzipped) bytes, so a load costs well under a second;
the uint8 arrays are cached per directory because tests and sweeps load MNIST repeatedly.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

import numpy as np
import torch

from meshfl.config import DataConfig
from meshfl.data.datasets import DataError, Dataset

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# name -> (md5 of the gzipped file as torchvision publishes it, md5 of the uncompressed IDX).
# The uncompressed md5 also accepts a faithful re-gzip, whose header bytes (mtime) differ.
FILES: dict[str, tuple[str, str]] = {
    "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
}
MEAN, STD = 0.1307, 0.3081
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
DOWNLOAD_TIMEOUT_S = 60.0


def mnist_dir(config: DataConfig) -> Path:
    """Give the MNIST folder: data.path, else $MESHFL_DATA/mnist, else $MESHFL_CACHE/mnist (default ~/.cache/meshfl/mnist)."""
    if config.path:
        return Path(config.path).expanduser()
    if os.environ.get("MESHFL_DATA"):
        return Path(os.environ["MESHFL_DATA"]).expanduser() / "mnist"
    cache = os.environ.get("MESHFL_CACHE") or str(Path.home() / ".cache" / "meshfl")
    return Path(cache).expanduser() / "mnist"


def load_mnist(config: DataConfig) -> tuple[Dataset, Dataset]:
    """Load MNIST (train 60k, test 10k) as float32 [N,1,28,28] normalised with the usual MNIST mean/std.

    Files are looked for in `mnist_dir(config)` (uncompressed copies first) and, with
    `data.download`, the missing ones are downloaded there.

    Returns
    -------
    tuple[Dataset, Dataset]
        The training set and the test set.

    Raises
    ------
    DataError
        If a file is missing (and not downloaded), cannot be downloaded, or is corrupt.
    """
    directory = mnist_dir(config)
    paths = _locate(directory, config.download)
    signature = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    xtr, ytr, xte, yte = _parse_all(signature)
    return _to_dataset(xtr, ytr), _to_dataset(xte, yte)


def _to_dataset(images: np.ndarray, labels: np.ndarray) -> Dataset:
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)  # a writable copy of the cached array
    x.div_(255.0).sub_(MEAN).div_(STD)
    return Dataset(x, torch.from_numpy(labels.astype(np.int64)), 10, "mnist")


# ---------------------------------------------------------------- locating / downloading


def _locate(directory: Path, download: bool) -> list[Path]:
    """The four files in FILES order, preferring uncompressed copies; download the missing ones."""
    found: list[Path] = []
    for name in FILES:
        path = _existing(directory, name)
        if path is None:
            if not download:
                raise DataError(f"MNIST file {name} not found in {directory} and data.download is false; "
                                f"{_where_to_get()}")
            path = download_file(name, directory)
        found.append(path)
    return found


def _existing(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name.removesuffix(".gz"), directory / name):
        if candidate.is_file():
            return candidate
    return None


def _where_to_get() -> str:
    names = ", ".join(FILES)
    return (f"put {names} (from {MIRRORS[0]}) in $MESHFL_DATA/mnist or in the directory named by data.path")


def download_file(name: str, directory: Path) -> Path:
    """Fetch `name` from the first mirror that serves bytes with a known md5; write it atomically.

    Returns
    -------
    Path
        The file written, `directory / name`.

    Raises
    ------
    DataError
        If no mirror serves it (the message lists each mirror's failure) or it cannot be written.
    """
    errors: list[str] = []
    for mirror in MIRRORS:
        try:
            with urlopen(mirror + name, timeout=DOWNLOAD_TIMEOUT_S) as response:
                payload = response.read()
        except (URLError, OSError, ValueError) as exc:
            errors.append(f"{mirror}: {_one_line(exc)}")
            continue
        if not _verified(name, payload):
            errors.append(f"{mirror}: md5 mismatch")
            continue
        return _write_atomic(directory, name, payload)
    raise DataError(f"MNIST file {name} is missing from {directory} and could not be downloaded "
                    f"({'; '.join(errors)}); {_where_to_get()}")


def _verified(name: str, payload: bytes) -> bool:
    gz_md5, raw_md5 = FILES[name]
    if hashlib.md5(payload).hexdigest() == gz_md5:
        return True
    try:
        return hashlib.md5(gzip.decompress(payload)).hexdigest() == raw_md5
    except (OSError, EOFError, zlib.error):
        return False


def _write_atomic(directory: Path, name: str, payload: bytes) -> Path:
    """Write with a tmp file + rename in the same directory, so a crash or a racing process never sees half a file."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    except OSError as exc:
        raise DataError(f"cannot write MNIST into {directory} ({_one_line(exc)}); set MESHFL_CACHE or data.path "
                        "to a writable directory") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        target = directory / name
        os.replace(tmp, target)
        return target
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- parsing


@lru_cache(maxsize=2)
def _parse_all(signature: tuple[tuple[str, int, int], ...]) -> tuple[np.ndarray, ...]:
    """Parse the four files; keyed by (path, size, mtime) so a replaced file is re-read."""
    paths = [Path(entry[0]) for entry in signature]
    xtr, ytr = read_idx(paths[0], IMAGE_MAGIC), read_idx(paths[1], LABEL_MAGIC)
    xte, yte = read_idx(paths[2], IMAGE_MAGIC), read_idx(paths[3], LABEL_MAGIC)
    for images, labels, path in ((xtr, ytr, paths[1]), (xte, yte, paths[3])):
        if len(images) != len(labels):
            raise DataError(f"MNIST file {path}: {len(labels)} labels for {len(images)} images; re-download it")
        if labels.size and labels.max() > 9:
            raise DataError(f"MNIST file {path}: label {labels.max()} is not a digit; re-download it")
    return xtr, ytr, xte, yte


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a uint8 IDX file (optionally gzipped) as a read-only array.

    Parameters
    ----------
    path : Path
        The file (`.gz` is decompressed).
    magic : int
        The expected magic number (its low byte is the number of dimensions).

    Returns
    -------
    numpy.ndarray
        The uint8 array, read-only.

    Raises
    ------
    DataError
        Naming the file, if it is unreadable or corrupt.
    """
    data = _read_bytes(path)
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        raise DataError(f"MNIST file {path} is corrupt: bad magic number (expected {magic}); delete and re-download it")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"MNIST file {path} is corrupt: truncated header; delete and re-download it")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if ndim == 3 and dims[1:] != (28, 28):
        raise DataError(f"MNIST file {path} is corrupt: images are {dims[1:]}, expected (28, 28)")
    if len(data) != header + int(np.prod(dims)):
        raise DataError(f"MNIST file {path} is corrupt: {len(data) - header} data bytes for dims {dims}; "
                        "delete and re-download it")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return array  # frombuffer over bytes is already read-only


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"MNIST file {path} is unreadable or corrupt ({_one_line(exc)}); delete and re-download it") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
