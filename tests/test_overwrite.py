"""`--overwrite` never costs the old output: the new one is built in DST/.fp8norm-overwrite and swapped
in only once complete. A failed run, a kill -9 before the swap and a refusal for space leave the old
output byte-identical; `--resume` then finishes the new one, byte-identical to a clean run; a kill
during the swap is finished by `--resume`. Unshard checks rank files against the shard run's digests.

Each test checks the exit code, the one `Error:` line, the source before and after and what DST holds.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import fp8norm.output
from fp8norm.examples import make_example
from fp8norm.output import LOCK_NAME, MANIFEST_NAME, STAGING_NAME
from fp8norm.st_io import read_header
from tests.ckpt_utils import cli, fail_quantize_at, interrupt_when_paused, one_line_error, tree_bytes
from tests.test_safety import snapshot

SHARD = "300KB"
QUANTIZE = ["--max-shard-size", SHARD, "--skip-verify"]


def visible(dst: Path) -> dict[str, bytes]:
    """What DST holds as an output: everything but the hidden bookkeeping (lock, staging folder)."""
    return {k: v for k, v in tree_bytes(dst).items() if not k.startswith(".")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A source, an old output of it (repack, other files than quantize writes) and quantize's clean output."""
    root = tmp_path_factory.mktemp("overwrite")
    s = make_example(root / "src", "llama", "sharded", shards=2)
    cli("repack", s, root / "old", "--max-shard-size", "1MB")
    cli("quantize", s, root / "clean", *QUANTIZE)
    assert len(list((root / "clean").glob("model-*.safetensors"))) >= 3
    return s, root / "old", root / "clean"


def _old_output(runs, tmp_path) -> Path:
    dst = tmp_path / "dst"
    cli("repack", runs[0], dst, "--max-shard-size", "1MB")
    assert tree_bytes(dst) == tree_bytes(runs[1])
    return dst


def test_a_failed_overwrite_keeps_the_old_output_and_resume_finishes_the_new(runs, tmp_path, monkeypatch):
    s, old, clean = runs
    dst, src_before = _old_output(runs, tmp_path), snapshot(s)
    heal = fail_quantize_at(monkeypatch, 9, "injected failure at the 9th tensor")
    one_line_error(cli("quantize", s, dst, *QUANTIZE, "--overwrite", ok=False), "injected failure at the 9th tensor")
    heal()
    assert visible(dst) == tree_bytes(old)
    done = json.loads((dst / STAGING_NAME / MANIFEST_NAME).read_text())["done"]
    assert done and all((dst / STAGING_NAME / f).is_file() for f in done)  # the new output's finished shards
    cli("repack", dst, tmp_path / "copy")  # read as a source, DST is the old output: the new one is not copied
    assert not [k for k in tree_bytes(tmp_path / "copy") if k.startswith(".")]
    res = cli("quantize", s, dst, *QUANTIZE, "--resume")
    assert f"{len(done)} already done" in res.output
    assert tree_bytes(dst) == tree_bytes(clean) and snapshot(s) == src_before


def test_overwrite_refused_for_space_keeps_the_old_output(runs, tmp_path, monkeypatch):
    s, old, clean = runs
    dst, src_before = _old_output(runs, tmp_path), snapshot(s)
    before = snapshot(dst)
    new_bytes = sum(len(v) for k, v in tree_bytes(clean).items() if k != MANIFEST_NAME)  # every file, exactly
    monkeypatch.setattr(fp8norm.output.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    line = one_line_error(cli("quantize", s, dst, *QUANTIZE, "--overwrite", ok=False),
                          f"{dst}: --overwrite builds the new output beside the old one",
                          f"that needs {new_bytes:,} bytes, only 1,000 are free",
                          f"remove {dst} yourself and run again without --overwrite")
    old_bytes = sum(len(v) for v in tree_bytes(old).values())
    assert f"the old output's {old_bytes:,} bytes are freed only at the end" in line
    assert snapshot(dst) == before and snapshot(s) == src_before


def _started(src, dst, *extra, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fp8norm", "quantize", str(src), str(dst), *QUANTIZE, "-q", *extra],
                            env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _quantize(src, dst, *extra, env=None) -> subprocess.CompletedProcess:
    proc = _started(src, dst, *extra, env=env)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_overwrite_killed_at_many_points_keeps_the_old_output_until_the_swap(runs, tmp_path):
    """kill -9 of an --overwrite: before the swap the old output is byte-identical; at every point
    (in the swap too) `--resume` ends byte-identical to a clean run."""
    s, old, clean = runs
    counter = tmp_path / "points"
    count_dst = _old_output(runs, tmp_path)
    assert _quantize(s, count_dst, "--overwrite", env={"FP8NORM_COUNT_POINTS": str(counter)}).returncode == 0
    assert tree_bytes(count_dst) == tree_bytes(clean)
    n = int(counter.read_text())
    swap = len(tree_bytes(old)) + len(tree_bytes(clean))  # one point per entry moved aside or up
    before_swap = n - swap
    points = sorted({1, before_swap // 3, 2 * before_swap // 3, before_swap, before_swap + 2, n - 2, n})
    for kill_at in points:
        dst = tmp_path / f"o{kill_at}"
        cli("repack", s, dst, "--max-shard-size", "1MB")
        res = _quantize(s, dst, "--overwrite", env={"FP8NORM_KILL_AT": str(kill_at)})
        assert res.returncode == -signal.SIGKILL, (kill_at, res.stderr)
        if kill_at <= before_swap:
            assert visible(dst) == tree_bytes(old), kill_at
        res = _quantize(s, dst, "--resume")
        assert res.returncode == 0, (kill_at, res.stderr)
        assert tree_bytes(dst) == tree_bytes(clean), kill_at
        assert not (dst / STAGING_NAME).exists() and not (dst / LOCK_NAME).exists()


def test_overwrite_again_after_a_failed_one_starts_the_new_output_afresh(runs, tmp_path):
    s, old, clean = runs
    dst = _old_output(runs, tmp_path)
    res = _quantize(s, dst, "--overwrite", env={"FP8NORM_KILL_AT": "12"})
    assert res.returncode == -signal.SIGKILL and (dst / STAGING_NAME).is_dir()
    one_line_error(cli("quantize", s, dst, *QUANTIZE, ok=False), "exists and is not empty")
    cli("quantize", s, dst, *QUANTIZE, "--overwrite")
    assert tree_bytes(dst) == tree_bytes(clean)


# ---------------------------------------------------------------- unshard: rank files checked by digest

@pytest.fixture(scope="module")
def mcore(tmp_path_factory):
    """An FP8 per-channel checkpoint split over 2 TP ranks (row-parallel scales replicated), and its unshard."""
    root = tmp_path_factory.mktemp("mcore")
    s = make_example(root / "src", "llama", "sharded", shards=2)
    cli("quantize", s, root / "ch", "--scheme", "fp8-channel", "--skip-verify")
    cli("shard", root / "ch", root / "mc", "--layout", "mcore", "--tp", "2")
    cli("unshard", root / "mc", root / "clean")
    return root / "mc", root / "clean"


def _flip_a_byte(path: Path, tensor: str) -> None:
    info = read_header(path)[0][tensor]
    data = bytearray(path.read_bytes())
    data[info.begin + 1] ^= 0x40
    path.write_bytes(bytes(data))


def test_unshard_refuses_a_tampered_rank_file_and_a_failed_overwrite_keeps_the_old_output(mcore, tmp_path):
    mc, clean = mcore
    bad = tmp_path / "mc"
    subprocess.run(["cp", "-a", str(mc), str(bad)], check=True)
    rank1 = bad / "iter_0000000" / "mp_rank_01_000" / "model.safetensors"
    _flip_a_byte(rank1, "decoder.layers.1.mlp.linear_fc2.weight_scale")
    src_before = snapshot(bad)
    one_line_error(cli("unshard", bad, tmp_path / "new", ok=False), f"{rank1}: its bytes differ from those the "
                   "shard run wrote (xxh3-128 recorded in fp8norm-manifest.json)", "--trust-rank-files")
    assert not (tmp_path / "new").exists()
    # trusted, the row-parallel replicas of that scale now differ: found only while joining
    dst = tmp_path / "dst"
    cli("unshard", mc, dst)
    one_line_error(cli("unshard", bad, dst, "--overwrite", "--trust-rank-files", ok=False),
                   "model.layers.1.mlp.down_proj.weight_scale: its pieces", "differ, so they cannot be joined")
    assert visible(dst) == tree_bytes(clean) and snapshot(bad) == src_before
    cli("unshard", mc, dst, "--resume")  # the good rank files: the new output finishes, swapped in
    assert tree_bytes(dst) == tree_bytes(clean)


def test_unshard_without_the_shard_manifest_names_it(mcore, tmp_path):
    mc, clean = mcore
    bare = tmp_path / "mc"
    subprocess.run(["cp", "-a", str(mc), str(bare)], check=True)
    (bare / MANIFEST_NAME).unlink()
    one_line_error(cli("unshard", bare, tmp_path / "o", ok=False), f"{bare / MANIFEST_NAME}: missing",
                   "--trust-rank-files")
    cli("unshard", bare, tmp_path / "o", "--trust-rank-files")
    assert tree_bytes(tmp_path / "o") == tree_bytes(clean)


def test_unshard_names_a_layout_that_does_not_fit_its_tensors(mcore, tmp_path):
    mc, _ = mcore
    edited = tmp_path / "mc"
    subprocess.run(["cp", "-a", str(mc), str(edited)], check=True)
    layout = edited / "fp8norm_parallel_layout.json"
    doc = json.loads(layout.read_text())
    doc["scheme"] = "mxfp4"  # the rank files hold fp8-channel weights (X.weight + X.weight_scale)
    layout.write_text(json.dumps(doc))
    one_line_error(cli("unshard", edited, tmp_path / "o", ok=False),
                   f"{layout}: the tensors it lists do not fit its scheme 'mxfp4' (", "the layout was edited, or "
                   "written for other rank files")
    assert not (tmp_path / "o").exists()


def test_ctrl_c_of_an_overwrite_says_the_old_output_is_untouched(runs, tmp_path):
    s, old, clean = runs
    dst, flag = _old_output(runs, tmp_path), tmp_path / "paused"
    run = _started(s, dst, "--overwrite", env={"FP8NORM_PAUSE_AT": "shard-renamed:2",
                                                      "FP8NORM_PAUSE_FILE": str(flag)})
    _, _, stderr = interrupt_when_paused(run, flag)
    assert run.returncode == 130, stderr
    done = json.loads((dst / STAGING_NAME / MANIFEST_NAME).read_text())["done"]
    shards = len(list(clean.glob("model-*.safetensors")))
    assert stderr.splitlines()[0] == (
        f"Interrupted: the previous output in {dst} is untouched; {len(done)} of {shards} output file(s) of the new "
        f"one are finished and kept in {dst / STAGING_NAME} (listed in {MANIFEST_NAME}).")
    assert stderr.splitlines()[1].endswith(f"{shlex.join(['quantize', str(s), str(dst), *QUANTIZE, '-q'])} --resume")
    assert visible(dst) == tree_bytes(old)
    assert _quantize(s, dst, "--resume").returncode == 0
    assert tree_bytes(dst) == tree_bytes(clean)


def test_overwrite_under_torchrun_keeps_the_old_output_when_a_rank_fails(runs, tmp_path):
    s, old, clean = runs
    dst = _old_output(runs, tmp_path)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "fp8norm",
           "quantize", str(s), str(dst), *QUANTIZE, "-q"]
    res = subprocess.run([*run, "--overwrite"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, FP8NORM_FAIL_RANK="1"))
    assert res.returncode != 0 and "rank 1 of 2 failed: injected failure on rank 1" in res.stdout + res.stderr
    assert visible(dst) == tree_bytes(old)
    res = subprocess.run([*run, "--resume"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert tree_bytes(dst) == tree_bytes(clean)
