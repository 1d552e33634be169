"""fp8norm.atomic: a file is complete under its final name or not there; the old file stays on error."""

import errno
import os

import pytest

from fp8norm.atomic import AtomicFile, partial_path


def test_commit_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path, fsyncs):
    path = tmp_path / "out.bin"
    with AtomicFile(path) as f:
        f.file.write(b"new bytes")
        assert not path.exists() and partial_path(path).read_bytes() == b""  # buffered, not yet flushed
    assert path.read_bytes() == b"new bytes"
    assert fsyncs == [str(tmp_path / ".out.bin.partial"), str(tmp_path)]
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_file_written_by_path_is_fsynced_too(tmp_path, fsyncs):
    path = tmp_path / "copy.txt"
    with AtomicFile(path, open_file=False) as f:
        f.tmp.write_text("by path")
    assert path.read_text() == "by path"
    assert fsyncs == [str(tmp_path / ".copy.txt.partial"), str(tmp_path)]


def test_a_write_error_leaves_the_old_file_and_no_partial_and_names_the_final_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(OSError) as e:
        with AtomicFile(path) as f:
            f.file.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")  # as a write through a file object: no name
    assert e.value.filename == str(path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_an_fsync_error_at_commit_drops_the_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    f = AtomicFile(path)
    f.file.write(b"new")
    with pytest.raises(OSError, match="Input/output error") as e:
        f.commit()
    assert e.value.filename == str(path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_a_failed_rename_drops_the_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"

    def replace(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(a))

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError) as e:
        with AtomicFile(path) as f:
            f.file.write(b"x")
    assert e.value.filename == str(path)  # the partial name means nothing to the user
    assert os.listdir(tmp_path) == []


def test_abort_never_raises_and_removes_the_partial_file(tmp_path):
    f = AtomicFile(tmp_path / "a")
    f.file.write(b"x")
    f.abort()
    f.abort()  # twice: still quiet
    assert os.listdir(tmp_path) == []


def test_a_missing_directory_is_named_as_the_final_file(tmp_path):
    path = tmp_path / "no" / "such" / "file"
    with pytest.raises(FileNotFoundError) as e:
        AtomicFile(path)
    assert e.value.filename == str(path)
