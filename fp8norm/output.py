"""The output directory of every writing command: checked, locked, resumable, written atomically.

`OutputDir.open()` (rank 0 only) runs once the plan and every other check have passed:

- SRC and DST are compared by identity, not by path strings: device and inode up both parent chains,
  and each path's place inside its file system (from the mount table), so DST == SRC, DST inside SRC
  and SRC inside DST are refused through symlinks and bind mounts alike;
- an exclusive `flock` on DST/.fp8norm.lock is held until the run ends; a second run on the same DST
  stops with one line naming the first run's pid, before it touches any file there;
- `overwrite` of a DST that holds something builds the new output in DST/.fp8norm-overwrite and swaps
  it in only once it is complete (see `OutputDir.swap_in`), so a failed or interrupted run leaves the
  previous output as it was, and `--resume` continues the new one. The staging folder sits inside DST,
  not beside it: DST may be a mount point, and a rename across file systems fails;
- `resume` reads the manifest(s) of the interrupted run: same plan fingerprint, the same source files
  (size; where the mtime changed, the bytes read for the finished files must give the same digests),
  and each finished output file still of its recorded size and sha256 (else it is written again).

Files appear under their final names only when complete (fp8norm.atomic: written to `.NAME.partial`,
fsynced, renamed, the directory fsynced). Every OSError comes out as one line naming the file (see
`io_error`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from . import _faults, digest, distributed
from .atomic import PARTIAL_GLOB, AtomicFile
from .checkpoint import OUTPUT_WORK_FOLDERS, read_json

MANIFEST_NAME = "fp8norm-manifest.json"
# under torchrun each rank records its finished files in its own manifest (no two ranks write one file)
RANK_MANIFEST = ".fp8norm-manifest.rank{rank}.json"
RANK_MANIFEST_GLOB = ".fp8norm-manifest.rank*.json"
LOCK_NAME = ".fp8norm.lock"
PROVENANCE_NAME = "fp8norm.json"
# the new output of an --overwrite until it is complete; the old output's entries while they are moved
# aside; ... once all are (the renamed folder marks that step as done)
STAGING_NAME, _MOVING_ASIDE, _ASIDE = OUTPUT_WORK_FOLDERS
_BOOKKEEPING = {LOCK_NAME, distributed.FAIL_FILE, distributed.PROGRESS_DIR, *OUTPUT_WORK_FOLDERS}


class OutputError(ValueError):
    """DST cannot be written as asked (inside SRC, locked by another run, made by another plan...)."""


def fingerprint(obj) -> str:
    """sha256 of the canonical JSON of `obj`: what decides a command's output bytes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def json_text(doc) -> str:
    """How every JSON file of an output is written (index, config, layout, provenance)."""
    return json.dumps(doc, indent=2) + "\n"


def provenance(**fields) -> dict:
    """fp8norm.json: who made this checkpoint and how (`fields` are the command's own)."""
    from . import __version__

    return {"producer": {"name": "fp8norm", "version": __version__}, **fields}


def index_text(weight_map: dict[str, str], total_size: int) -> str:
    """model.safetensors.index.json for `weight_map` {tensor: file}."""
    return json_text({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})


def with_file(e: OSError, path) -> OSError:
    """`e` with the file it concerns (writes through an open file object do not name it)."""
    if e.filename is None:
        e.filename = str(path)
    return e


def io_error(e: OSError, dst: Path, still_needed: int, finished: int) -> OutputError:
    """One line for an OSError while writing DST: the file, what is missing, and that --resume goes on."""
    where = e.filename or dst
    if e.errno == errno.ENOSPC:
        try:
            free = f"{shutil.disk_usage(dst).free:,}"
        except OSError:
            free = "?"
        return OutputError(f"{where}: no space left on device: the output still needs {still_needed:,} bytes "
                           f"({finished:,} bytes of finished files are kept), {free} are free; free space and "
                           "run again with --resume")
    return OutputError(f"{where}: {e.strerror or e}; the output still needs {still_needed:,} bytes; fix this and "
                       "run again with --resume to continue")


# ------------------------------------------------------------------ file identity

def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, root of the mount inside its file system, device) from /proc/self/mountinfo."""
    def unescape(s: str) -> str:
        return s.encode().decode("unicode_escape") if "\\" in s else s

    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        f = line.split()
        if len(f) >= 5:
            out.append((unescape(f[4]), unescape(f[3]), f[2]))
    return out


def _existing(p: Path) -> tuple[Path, tuple[str, ...]]:
    """The nearest existing ancestor of `p` (resolved) and the path parts below it."""
    p = Path(os.path.abspath(p))
    rest: list[str] = []
    while not p.exists() and p != p.parent:
        rest.insert(0, p.name)
        p = p.parent
    return p.resolve(), tuple(rest)


def _fs_place(p: Path, mounts) -> tuple[str, str] | None:
    """(device, path inside that file system) of `p`: the same for every bind mount showing it."""
    base, rest = _existing(p)
    full = str(Path(base, *rest))
    best = None
    for point, root, dev in mounts:
        if full == point or full.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best[0]):
                best = (point, root, dev)
    if best is None:
        return None
    point, root, dev = best
    inside = full[len(point.rstrip("/")):] if point != "/" else full
    return dev, os.path.normpath(root.rstrip("/") + "/" + inside.lstrip("/"))


def _identities(p: Path) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of `p` (or its nearest existing ancestor) and of every ancestor, both as
    written and resolved (a symlink in the path counts as what it points to)."""
    out = []
    for chain in (Path(os.path.abspath(p)), _existing(p)[0]):
        for a in [chain, *chain.parents]:
            try:
                st = os.stat(a)
            except OSError:
                continue
            out.append((st.st_dev, st.st_ino))
    return out


def _inside(a: tuple[str, str] | None, b: tuple[str, str] | None) -> bool:
    return a is not None and b is not None and a[0] == b[0] and (a[1] == b[1] or a[1].startswith(b[1].rstrip("/") + "/"))


def check_separate(src: Path, dst: Path) -> None:
    """Refuse DST == SRC, DST inside SRC and SRC inside DST, by file identity (symlinks, bind mounts)."""
    src, dst = Path(src), Path(dst)
    s = os.stat(src)
    src_id = (s.st_dev, s.st_ino)
    mounts = _mounts()
    src_place, dst_place = _fs_place(src, mounts), _fs_place(dst, mounts)
    if src_id in _identities(dst) or _inside(dst_place, src_place):
        same = dst.exists() and os.path.samefile(src, dst)
        raise OutputError(f"{dst}: the output may not be the source directory or inside it ({src}"
                          f"{'; the same directory through a link or mount' if same else ''})")
    if dst.exists():
        d = os.stat(dst)
        if (d.st_dev, d.st_ino) in _identities(src) or _inside(src_place, dst_place):
            raise OutputError(f"{dst}: the output may not contain the source directory ({src})")


# ------------------------------------------------------------------ manifest

def read_manifest(path: Path) -> dict:
    try:
        m = read_json(path, "fp8norm manifest", error=OutputError)
    except OutputError as e:
        raise OutputError(f"{e}; use --overwrite to start again") from None
    if not isinstance(m.get("done", {}), dict) or not all(isinstance(v, dict) for v in m.get("done", {}).values()):
        raise OutputError(f"{path}: malformed fp8norm manifest ('done' is not a map of file records); use "
                          "--overwrite to start again")
    return m


def check_digest_kind(path: Path, manifest: dict) -> None:
    """Refuse a manifest whose digests are of another kind than fp8norm.digest computes (made before
    the change to XXH3: no `digest` field, sha256): comparing them would call every file changed."""
    kind = manifest.get("digest", "sha256")
    if kind != digest.ALGORITHM:
        raise OutputError(f"{path}: records {kind} digests (an older fp8norm); this fp8norm checks "
                          f"{digest.ALGORITHM}: use --overwrite to start again")


class ManifestRecord:
    """This process's running record of finished files: the main manifest, or under torchrun its
    rank's own (folded into the main one by rank 0 at the end, or by a later --resume)."""

    def __init__(self, dst: Path, fp: str, sources: dict, ctx, done: dict | None = None):
        name = MANIFEST_NAME if ctx is None or ctx.rank == 0 else RANK_MANIFEST.format(rank=ctx.rank)
        self.dst, self.path = dst, dst / name
        self.data = {"fingerprint": fp, "complete": False, "sources": sources, "done": dict(done or {}),
                     "digest": digest.ALGORITHM}

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True))

    def finished(self, name: str, record: dict) -> None:
        self.data["done"][name] = record
        self.save()


def read_manifests(folder: Path, fp: str) -> tuple[dict, dict[str, dict]]:
    """The main manifest in `folder`, and {file: record} of the files it and the ranks' manifests of an
    interrupted torchrun job (any number of ranks) record as done; each checked to hold digests of
    fp8norm.digest's kind and to come from the plan with fingerprint `fp`."""
    main_path = folder / MANIFEST_NAME
    main = read_manifest(main_path)
    done: dict[str, dict] = {}
    for path in [main_path, *sorted(folder.glob(RANK_MANIFEST_GLOB))]:
        m = main if path == main_path else read_manifest(path)
        check_digest_kind(path, m)
        if m.get("fingerprint") != fp:
            raise OutputError(f"{folder}: was started with other settings or another source (plan "
                              "fingerprints differ); use --overwrite to start again")
        done.update(m.get("done", {}))
    return main, done


def save_folded_manifest(folder: Path, fp: str, sources: dict, done: dict, *, complete: bool = False) -> None:
    """The main manifest recording `done`; then the ranks' manifests, folded into it, are removed."""
    record = ManifestRecord(folder, fp, sources, None, done)
    record.data["complete"] = complete
    record.save()
    for p in folder.glob(RANK_MANIFEST_GLOB):
        p.unlink()


def source_identity(root: Path, files) -> dict:
    """{file relative to SRC: {size, mtime_ns}} of the source files a run reads."""
    out = {}
    for f in files:
        st = os.stat(f)
        out[str(Path(f).relative_to(root))] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


# ------------------------------------------------------------------ the directory

def atomic_write_text(path: Path, text: str) -> None:
    with AtomicFile(path, label="text") as f:
        f.file.write(text.encode())


# errors of the written side of a copy (shutil's fast copy names the file read from in them)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def copy_file(src: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(out, open_file=False) as f:
        try:
            shutil.copyfile(src, f.tmp)
        except OSError as e:
            if e.errno in _WRITE_ERRNOS:
                e.filename, e.filename2 = None, None  # named as `out` by AtomicFile
            raise


class OutputDir:
    """DST of one run (see the module docstring). `open()` on rank 0; `close()` releases the lock."""

    def __init__(self, src: Path, dst: Path, fp: str, *, resume: bool, overwrite: bool):
        if resume and overwrite:
            raise OutputError("--resume and --overwrite exclude each other: --resume continues DST, "
                              "--overwrite replaces it")
        self.src, self.dst, self.fingerprint = Path(src), Path(dst), fp
        self.resume, self.overwrite = resume, overwrite
        self.work = self.dst
        self._lock_fd: int | None = None

    def check(self) -> None:
        """What can be checked without touching DST (run before planning output bytes is final)."""
        check_separate(self.src, self.dst)
        if self.dst.exists() and not self.dst.is_dir():
            raise OutputError(f"{self.dst}: exists and is not a directory")

    def open(self, needed_bytes, sources: dict) -> dict[str, dict]:
        """Lock DST, check it may be written, and return {file: record} of finished files to keep.
        `self.work` is then the folder the run writes: DST, or its staging folder for an --overwrite of
        a DST that holds something (or a --resume of such a run).

        `needed_bytes(kept)` gives the bytes still to write when the files in `kept` are kept."""
        self.check()
        dst = self.dst
        try:
            dst.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{dst}: cannot create the output directory ({e.strerror})") from None
        if not os.access(dst, os.W_OK):
            raise OutputError(f"{dst}: not writable")
        self._lock()
        staging = dst / STAGING_NAME
        if (self.resume or self.overwrite) and ((dst / _MOVING_ASIDE).exists() or (dst / _ASIDE).exists()):
            self.swap_in()  # an earlier --overwrite was killed while swapping its complete output in
        old = [p for p in dst.iterdir() if p.name not in _BOOKKEEPING and not p.name.endswith(".partial")]
        self.work = dst
        done: dict[str, dict] = {}
        if self.resume and staging.exists():
            self.work = staging  # an interrupted --overwrite: the old output stays until the new one is done
            done = self._finished_files(sources) if (staging / MANIFEST_NAME).exists() else {}
        elif old and self.resume:
            done = self._finished_files(sources)
        elif self.overwrite:
            if staging.exists():  # an earlier --overwrite's unfinished output: never part of the old one
                shutil.rmtree(staging)
            if old:
                self.work = staging
        elif old or staging.exists():
            raise OutputError(f"{dst}: exists and is not empty; pass --resume to continue an interrupted "
                              "run or --overwrite to replace it")
        needed, free = needed_bytes(set(done)), shutil.disk_usage(dst).free
        if needed > free and self.work != dst:
            old_bytes = sum(p.stat().st_size for q in old for p in ([q] if q.is_file() else q.rglob("*"))
                            if p.is_file())
            raise OutputError(f"{dst}: --overwrite builds the new output beside the old one and replaces it "
                              f"only once complete: that needs {needed:,} bytes, only {free:,} are free (the "
                              f"old output's {old_bytes:,} bytes are freed only at the end); remove {dst} "
                              "yourself and run again without --overwrite")
        if needed > free:
            raise OutputError(f"{dst}: the output needs {needed:,} bytes, only {free:,} are free on "
                              "that file system")
        self.work.mkdir(exist_ok=True)
        for p in self.work.rglob(PARTIAL_GLOB):  # leftovers of an interrupted write are never part of an output
            p.unlink()
        (self.work / distributed.FAIL_FILE).unlink(missing_ok=True)  # left by an earlier failed torchrun job
        return done

    def swap_in(self) -> None:
        """Replace the old output in DST by the complete new one in its staging folder, by renames inside
        DST: the old entries are moved aside (into a folder renamed once all are there), the new ones
        moved up (the manifest last), the old ones deleted. Killed at any point, running this again
        (`open` does, for --resume and --overwrite) finishes the swap."""
        dst, staging = self.dst, self.dst / STAGING_NAME
        moving, aside = dst / _MOVING_ASIDE, dst / _ASIDE
        if not aside.exists():
            moving.mkdir(exist_ok=True)
            for p in sorted(dst.iterdir()):
                if p.name not in _BOOKKEEPING:
                    os.rename(p, moving / p.name)
                    _faults.point("swap-aside")
            os.rename(moving, aside)
        if staging.exists():
            for p in sorted(staging.iterdir(), key=lambda p: p.name == MANIFEST_NAME):  # the manifest last
                if p.name not in _BOOKKEEPING:
                    os.rename(p, dst / p.name)
                    _faults.point("swap-up")
            shutil.rmtree(staging)
        shutil.rmtree(aside)
        self.work = dst

    def _lock(self) -> None:
        path = self.dst / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputError(f"{self.dst}: another fp8norm run (pid {other}) is writing here; wait for it "
                                  "to end or stop it, then run again") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else a run that just finished removed the file we locked: lock the new one
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        """Release the lock and remove its file (a run waiting to lock it retries on the new file)."""
        if self._lock_fd is None:
            return
        (self.dst / LOCK_NAME).unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None

    def _finished_files(self, sources: dict) -> dict[str, dict]:
        dst = self.work
        manifest_path = dst / MANIFEST_NAME
        if not manifest_path.exists():
            raise OutputError(f"{dst}: not empty and holds no {MANIFEST_NAME}: nothing to resume "
                              "(use --overwrite to replace it)")
        main, done = read_manifests(dst, self.fingerprint)
        recorded = main.get("sources")
        if not isinstance(recorded, dict):
            raise OutputError(f"{manifest_path}: records no source files (made by an older fp8norm?); use "
                              "--overwrite to start again")
        self.changed_mtime = set()
        for rel, now in sources.items():
            was = recorded.get(rel)
            if not isinstance(was, dict) or was.get("size") != now["size"]:
                raise OutputError(f"{self.src / rel}: the source changed since the interrupted run "
                                  f"({'new file' if not isinstance(was, dict) else 'other size'}); use "
                                  "--overwrite to start again")
            if was.get("mtime_ns") != now["mtime_ns"]:
                self.changed_mtime.add(rel)
        keep = {}
        for name, rec in done.items():
            p = dst / name
            if p.is_file() and p.stat().st_size == rec.get("size") and digest.of_file(p) == rec.get("digest"):
                keep[name] = rec  # else written again
        return keep
