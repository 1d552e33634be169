"""fp8norm.engine.run_jobs on its own: jobs of source tensors into output files, the closing files and a
manifest whose records match the files; a failing job leaves the finished files (and no partial one),
and --resume completes the same bytes."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8norm import digest
from fp8norm.checkpoint import open_checkpoint
from fp8norm.engine import Job, run_jobs
from fp8norm.output import MANIFEST_NAME
from fp8norm.st_io import OutEntry

NAMES = ("a", "b", "c", "d")


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({n: torch.randn(8, 16, generator=g).to(torch.bfloat16) for n in NAMES}, str(root / "model.safetensors"))
    (root / "config.json").write_text('{"model_type": "test"}\n')
    return root


def _jobs(fail_on: str | None = None, once: Path | None = None) -> list[Job]:
    """Each tensor doubled, a and b into one file, c and d into another; `fail_on` raises once the file
    `once` exists (the writer runs beside the computations)."""
    def job(name, file):
        def compute(xs, which):
            if name == fail_on:
                deadline = time.monotonic() + 30
                while not once.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                raise ValueError(f"injected failure at {name}")
            return [xs[0] * 2 for _ in which]
        return Job((name,), [(file, OutEntry(name, "BF16", (8, 16)))], compute)

    return [job(n, "out-1.safetensors" if n in "ab" else "out-2.safetensors") for n in NAMES]


def _run(src, dst, jobs, **kw):
    return run_jobs(open_checkpoint(src), jobs, dst, fingerprint="f" * 64, buffer_bytes=1 << 20, progress=False,
                    texts={"notes.json": '{"made": "by a test"}\n'}, copies=(Path("config.json"),), **kw)


def test_every_file_is_written_with_its_manifest_record(src, tmp_path):
    dst = tmp_path / "dst"
    stats = _run(src, dst, _jobs())
    source = load_file(str(src / "model.safetensors"))
    got = {**load_file(str(dst / "out-1.safetensors")), **load_file(str(dst / "out-2.safetensors"))}
    assert set(got) == set(NAMES) and all(torch.equal(got[n], source[n] * 2) for n in NAMES)
    assert (dst / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (dst / "notes.json").read_text() == '{"made": "by a test"}\n'
    assert sorted(os.listdir(dst)) == ["config.json", MANIFEST_NAME, "notes.json", "out-1.safetensors",
                                       "out-2.safetensors"]
    m = json.loads((dst / MANIFEST_NAME).read_text())
    assert m["complete"] is True and m["fingerprint"] == "f" * 64 and set(m["done"]) == {"out-1.safetensors",
                                                                                           "out-2.safetensors"}
    for f, rec in m["done"].items():
        assert rec["size"] == (dst / f).stat().st_size and rec["digest"] == digest.of_file(dst / f)
    assert (stats.tensors_in, stats.tensors_out, stats.files_written, stats.files_skipped) == (4, 4, 2, 0)
    assert stats.bytes_out == 4 * 8 * 16 * 2


def test_a_failing_job_keeps_the_finished_files_and_resume_completes_the_same_bytes(src, tmp_path):
    clean, dst = tmp_path / "clean", tmp_path / "dst"
    _run(src, clean, _jobs())
    with pytest.raises(ValueError, match="^injected failure at c$"):
        _run(src, dst, _jobs(fail_on="c", once=dst / "out-1.safetensors"))
    assert sorted(os.listdir(dst)) == [MANIFEST_NAME, "out-1.safetensors"]  # no partial, no closing file yet
    m = json.loads((dst / MANIFEST_NAME).read_text())
    assert m["complete"] is False and list(m["done"]) == ["out-1.safetensors"]
    stats = _run(src, dst, _jobs(), resume=True)
    assert (stats.files_skipped, stats.files_written) == (1, 1)
    assert {p: (dst / p).read_bytes() for p in os.listdir(clean)} == {p: (clean / p).read_bytes()
                                                                       for p in os.listdir(clean)}
