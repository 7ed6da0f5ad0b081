"""The package check's sdist extraction (tools/check_package.py): it must run on Debian 12's
stock Python 3.11.2, whose tarfile lacks extraction filters, without trusting the archive."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_check_package():
    spec = importlib.util.spec_from_file_location("check_package", ROOT / "tools/check_package.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_package = load_check_package()


def make_archive(path: Path, *members: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            data = b"payload" if member.isfile() else None
            if data is not None:
                member.size = len(data)
            tar.addfile(member, None if data is None else io.BytesIO(data))
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def good_members() -> list[tarfile.TarInfo]:
    return [
        entry("jxent-1.0", tarfile.DIRTYPE),
        entry("jxent-1.0/tests", tarfile.DIRTYPE),
        entry("jxent-1.0/tests/conftest.py"),
        entry("jxent-1.0/tests/alias.py", tarfile.SYMTYPE, "conftest.py"),
    ]


@pytest.mark.parametrize("filters", ["interpreter's", "none (Python 3.11.2)"])
def test_a_well_formed_archive_extracts(tmp_path, monkeypatch, filters):
    if filters.startswith("none"):
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = make_archive(tmp_path / "good.tar.gz", *good_members())
    check_package.extract_safely(archive, tmp_path / "out")
    unpacked = tmp_path / "out" / "jxent-1.0" / "tests"
    assert (unpacked / "conftest.py").read_bytes() == b"payload"
    assert (unpacked / "alias.py").read_bytes() == b"payload"


ESCAPES = {
    "parent path": entry("jxent-1.0/../escaped.py"),
    "absolute path": entry("/tmp/jxent-escaped.py"),
    "symlink out": entry("jxent-1.0/passwd", tarfile.SYMTYPE, "/etc/passwd"),
    "symlink up": entry("jxent-1.0/up", tarfile.SYMTYPE, "../.."),
    "hard link up": entry("jxent-1.0/hard", tarfile.LNKTYPE, "../outside"),
    "fifo": entry("jxent-1.0/pipe", tarfile.FIFOTYPE),
}


@pytest.mark.parametrize("kind", ESCAPES)
def test_without_filters_a_member_leaving_the_target_is_refused(tmp_path, monkeypatch, kind):
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    bad = ESCAPES[kind]
    archive = make_archive(tmp_path / "bad.tar.gz", *good_members(), bad)
    with pytest.raises(ValueError, match=f"archive member {bad.name!r}"):
        check_package.extract_safely(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written before every member is checked"
    assert not (tmp_path / "escaped.py").exists()
