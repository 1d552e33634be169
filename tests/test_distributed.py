"""torchrun: every rank count gives the same bytes; a failing rank stops all; resume across rank counts.

Runs real `torchrun --standalone` jobs on CPU (gloo); each rank is a process of its own.
"""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from fp8norm.distributed import DistContext, RankAborted, assign_shards, on_rank0, sum_over_ranks
from fp8norm.examples import make_example
from tests.ckpt_utils import tree_bytes

SHARD = "1MB"


def torchrun(n, *args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "fp8norm",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})), timeout=300)


def single(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fp8norm", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=300)


@pytest.fixture(scope="module")
def src_and_clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    src = make_example(root / "src", "qwen3.5-moe", "sharded")
    res = single("quantize", src, root / "clean", "--max-shard-size", SHARD, "-q")
    assert res.returncode == 0, res.stderr
    return src, root / "clean"


def test_assign_shards_is_deterministic_and_byte_balanced():
    sizes = {f"s{i}": size for i, size in enumerate([90, 10, 40, 40, 30, 30, 20, 5])}
    a = assign_shards(sizes, 3)
    assert a == assign_shards(dict(reversed(sizes.items())), 3)
    assert sorted(s for r in a for s in r) == sorted(sizes)
    loads = [sum(sizes[s] for s in r) for r in a]
    assert max(loads) - min(loads) <= 30 and loads[0] == 90  # the big shard alone on rank 0


class ThreeRanks(DistContext):
    """Rank `rank` of a job of three whose other ranks sent `others` (by rank) to the gather."""

    def __init__(self, rank: int, others: dict):
        super().__init__(rank, 3, rank)
        self.others = others

    def gather(self, obj) -> list:
        return [obj if r == self.rank else self.others[r] for r in range(self.world)]


def test_rank0_sums_every_ranks_counts_and_collects_their_notes():
    stats = SimpleNamespace(files_written=2, bytes_out=10, wall_s=1.5)
    notes = ["rank 0 note"]
    others = {1: ({"files_written": 3, "bytes_out": 20}, ["rank 1 note"]),
              2: ({"files_written": 0, "bytes_out": 0}, [])}
    per_rank = sum_over_ranks(ThreeRanks(0, others), stats, ("files_written", "bytes_out"), notes)
    assert per_rank == [{"files_written": 2, "bytes_out": 10}, {"files_written": 3, "bytes_out": 20},
                        {"files_written": 0, "bytes_out": 0}]
    assert (stats.files_written, stats.bytes_out, stats.wall_s) == (5, 30, 1.5)
    assert notes == ["rank 0 note", "rank 1 note"]
    mine = SimpleNamespace(files_written=3, bytes_out=20)
    sum_over_ranks(ThreeRanks(1, {0: ({"files_written": 2, "bytes_out": 10}, []), 2: others[2]}), mine,
                   ("files_written", "bytes_out"), None)
    assert (mine.files_written, mine.bytes_out) == (3, 20)  # other ranks keep their own counts


def _locked():
    raise ValueError("DST locked")


def test_on_rank0_shares_rank0s_result_or_its_error():
    assert on_rank0(None, lambda: 7) == 7
    assert on_rank0(ThreeRanks(0, {1: (None, None), 2: (None, None)}), lambda: 7) == 7
    assert on_rank0(ThreeRanks(2, {0: (7, None), 1: (None, None)}), lambda: pytest.fail("ran on rank 2")) == 7
    with pytest.raises(ValueError, match="^DST locked$"):
        on_rank0(ThreeRanks(0, {1: (None, None), 2: (None, None)}), _locked)
    with pytest.raises(RankAborted, match="^DST locked$"):
        on_rank0(ThreeRanks(1, {0: (None, "DST locked"), 2: (None, None)}), lambda: None)

@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_any_number_of_ranks_gives_identical_bytes(src_and_clean, tmp_path, ranks):
    src, clean = src_and_clean
    res = torchrun(ranks, "quantize", src, tmp_path / "o", "--max-shard-size", SHARD, "-q")
    assert res.returncode == 0, res.stderr[-3000:]
    assert tree_bytes(tmp_path / "o") == tree_bytes(clean)
    if ranks > 1:
        assert res.stdout.count("tensors   23 quantized") == 1  # rank 0 alone reports, for the whole job
        assert f"ranks     {ranks} (torchrun)" in res.stdout


def test_convert_under_torchrun(src_and_clean, tmp_path):
    _, clean = src_and_clean
    assert single("convert", clean, tmp_path / "one", "--to", "nvfp4", "--max-shard-size", SHARD, "-q").returncode == 0
    res = torchrun(2, "convert", clean, tmp_path / "two", "--to", "nvfp4", "--max-shard-size", SHARD, "-q")
    assert res.returncode == 0, res.stderr[-3000:]
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")


def test_a_failing_rank_stops_all_and_is_reported_once(src_and_clean, tmp_path):
    src, _ = src_and_clean
    res = torchrun(2, "quantize", src, tmp_path / "o", "--max-shard-size", SHARD, "-q",
                   env={"FP8NORM_FAIL_RANK": "1"})
    assert res.returncode != 0
    both = res.stdout + res.stderr
    assert both.count("rank 1 of 2 failed: injected failure on rank 1") == 1, both[-3000:]
    assert 'fp8norm/' not in both.split("Traceback")[-1] if "Traceback" in both else True  # only torchrun's own
    assert "terminate called" not in both  # every rank shut its process group down cleanly
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()
    # the failure does not stick: a resumed run completes
    res = torchrun(2, "quantize", src, tmp_path / "o", "--max-shard-size", SHARD, "-q", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (tmp_path / "o" / ".fp8norm-failed").exists()


@pytest.mark.parametrize("resume_ranks", [1, 3])
def test_resume_after_killing_one_rank(src_and_clean, tmp_path, resume_ranks):
    src, clean = src_and_clean
    res = torchrun(2, "quantize", src, tmp_path / "o", "--max-shard-size", SHARD, "-q",
                   env={"FP8NORM_KILL_RANK": "1", "FP8NORM_KILL_AT": "40"})
    assert res.returncode != 0
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()
    args = ("quantize", src, tmp_path / "o", "--max-shard-size", SHARD, "-q", "--resume")
    res = single(*args) if resume_ranks == 1 else torchrun(resume_ranks, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already done" in res.stdout and "0 already done" not in res.stdout
    assert tree_bytes(tmp_path / "o") == tree_bytes(clean)


@pytest.mark.parametrize("layout_args", [["--layout", "deepseek", "--mp", "2", "--n-experts", "4"],
                                         ["--layout", "mcore", "--pp", "2", "--ep", "2"]], ids=["deepseek", "mcore"])
def test_shard_under_torchrun_writes_the_same_files(tmp_path, layout_args):
    src = make_example(tmp_path / "src", "qwen3-moe", "sharded")
    assert single("shard", src, tmp_path / "one", *layout_args, "-q").returncode == 0
    res = torchrun(2, "shard", src, tmp_path / "two", *layout_args, "-q")
    assert res.returncode == 0, res.stderr[-3000:]
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")
    assert res.stdout.count("rank file(s)") == 1


def test_unshard_and_repack_under_torchrun_write_the_same_files(tmp_path):
    src = make_example(tmp_path / "src", "qwen3-moe", "sharded")
    assert single("shard", src, tmp_path / "mc", "--layout", "mcore", "--pp", "2", "--ep", "2", "-q").returncode == 0
    for args in (("unshard", tmp_path / "mc"), ("repack", src)):
        one, two = tmp_path / f"{args[0]}-one", tmp_path / f"{args[0]}-two"
        assert single(*args, one, "--max-shard-size", SHARD, "-q").returncode == 0
        res = torchrun(2, *args, two, "--max-shard-size", SHARD, "-q")
        assert res.returncode == 0, res.stderr[-3000:]
        assert tree_bytes(two) == tree_bytes(one)


def test_notes_of_every_rank_reach_the_summary(src_and_clean, tmp_path):
    """convert --to fp8-ue8m0 requantizes every weight of a float-scaled source: the requant line counts the
    tensors of both ranks, once."""
    _, clean = src_and_clean
    one = single("convert", clean, tmp_path / "one", "--to", "fp8", "--scale-fmt", "ue8m0", "--max-shard-size", SHARD, "-q")
    res = torchrun(2, "convert", clean, tmp_path / "two", "--to", "fp8", "--scale-fmt", "ue8m0", "--max-shard-size", SHARD, "-q")
    assert one.returncode == 0 and res.returncode == 0, res.stderr[-3000:]
    line = "23 tensor(s) requantized to power-of-two scales"
    assert line in one.stdout and res.stdout.count(line) == 1
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")
