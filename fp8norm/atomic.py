"""One way every output file is written: complete under its final name, or not there at all.

`AtomicFile(path)` writes `.NAME.partial` in the same directory (a rename is atomic only within one
file system); `commit()` fsyncs it, renames it to NAME and fsyncs the directory (else a crash can
lose the rename of a file whose bytes are safe); `abort()`, or an error inside `with`, drops the
partial file. OSErrors about the partial file name NAME: that is the file the user asked for.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from . import _faults

PARTIAL_GLOB = ".*.partial"


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


class AtomicFile:
    """`file`: the partial file open for binary writing, or None with `open_file=False` (the caller
    writes `tmp` by its path, e.g. a copy). `label`: the fault points around the rename
    (`LABEL-before-rename`, `LABEL-renamed`, see fp8norm._faults). `fsync_s`: seconds in fsync (file and directory)."""

    def __init__(self, path: str | os.PathLike, *, label: str | None = None, open_file: bool = True):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.label = label
        self.fsync_s = 0.0
        self.file = None
        if open_file:
            with self.naming_errors():
                self.file = open(self.tmp, "wb")

    @contextlib.contextmanager
    def naming_errors(self):
        """An OSError with no file, or about the partial file, is given the final name (writes through
        an open file object name no file; the partial name means nothing to the user)."""
        try:
            yield
        except OSError as e:
            self._name(e)
            raise

    def _name(self, e: OSError) -> None:
        if e.filename in (None, str(self.tmp)):
            e.filename = str(self.path)

    def commit(self) -> None:
        """fsync, rename to `path`, fsync the directory; an error before the rename drops the partial file."""
        with self.naming_errors():
            try:
                if self.file is not None:
                    self.file.flush()
                    self._fsync(self.file.fileno())
                    self.file.close()
                else:
                    self._fsync_path(self.tmp, os.O_RDONLY)
                if self.label:
                    _faults.point(f"{self.label}-before-rename")
                os.replace(self.tmp, self.path)
            except BaseException:
                self.abort()
                raise
            if self.label:
                _faults.point(f"{self.label}-renamed")
            self._fsync_path(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)

    def abort(self) -> None:
        """Drop the partial file; never raises (it runs while another error is on its way up)."""
        try:
            if self.file is not None:
                self.file.close()
        except OSError:
            pass  # e.g. the buffered tail hit a full disk again: the file is dropped anyway
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass

    def _fsync(self, fd: int) -> None:
        t0 = time.perf_counter()
        os.fsync(fd)
        self.fsync_s += time.perf_counter() - t0

    def _fsync_path(self, path: Path, flags: int) -> None:
        fd = os.open(path, flags)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            self.commit()
            return
        self.abort()
        if isinstance(error, OSError):
            self._name(error)
