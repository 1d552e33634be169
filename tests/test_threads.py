"""CPU threads are chosen from what the process may use: affinity, cgroup quota, torchrun ranks on the
node, minus the pipeline's reader and writer threads; --threads overrides."""

import os

import pytest
import torch
from click.testing import CliRunner

from fp8norm import threads
from fp8norm.cli import main
from fp8norm.examples import make_example


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "cpu.max"
    v2.write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(v2, (tmp_path / "no", tmp_path / "no")) is None
    v2.write_text("250000 100000\n")
    assert threads.cgroup_cpu_limit(v2) == 2.5
    q, p = tmp_path / "q", tmp_path / "p"
    q.write_text("-1\n")
    p.write_text("100000\n")
    assert threads.cgroup_cpu_limit(tmp_path / "none", (q, p)) is None
    q.write_text("300000\n")
    assert threads.cgroup_cpu_limit(tmp_path / "none", (q, p)) == 3.0


def test_usable_cpus_is_affinity_capped_by_quota(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.usable_cpus() == 16
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2.5)
    assert threads.usable_cpus() == 3


@pytest.mark.parametrize("cpus,env,want,workers", [
    (16, {}, 7, 2),                                        # 2 workers x (16 - 1 for reader and writer) // 2
    (2, {}, 1, 2),                                         # 2 workers x 1: no barrier between them
    (1, {}, 1, 1),                                         # at least one
    (16, {"LOCAL_WORLD_SIZE": "4"}, 1, 2),                 # 4 ranks share the node: 4 each, less 1, halved
    (16, {"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}, 1, 2),  # torchrun's own OMP=1 is not a choice
    (16, {"OMP_NUM_THREADS": "3"}, 3, 1),                  # the user's OMP_NUM_THREADS is: one worker
])
def test_default_choice(monkeypatch, cpus, env, want, workers):
    monkeypatch.setattr(threads, "usable_cpus", lambda: cpus)
    choice = threads.choose_threads(env=env)
    assert (choice.threads, choice.workers) == (want, workers)
    assert (threads.choose_threads(5, env=env).threads, threads.choose_threads(5, env=env).workers) == (5, 1)
    assert threads.choose_threads(env=env, io_threads=0).workers == 1


def test_cli_applies_and_reports_the_choice(tmp_path, restore_threads):
    src = make_example(tmp_path / "src", "llama", "single")
    res = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "o"), "--threads", "1", "-q"])
    assert res.exit_code == 0, res.output
    assert "threads   1 intra-op thread(s): --threads" in res.output and torch.get_num_threads() == 1
    for bad in ("0", str((os.cpu_count() or 1) + 1), "100000"):  # more threads than CPUs only spin (or exhaust)
        res = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "p"), "--threads", bad])
        assert res.exit_code == 2 and f"Invalid value for '--threads': {bad} is not in the range 1<=x<=" in res.output
        assert not (tmp_path / "p").exists()


def test_thread_exhaustion_is_one_line(tmp_path, monkeypatch, restore_threads):
    """When the system refuses another thread (ulimit -u, pids.max), the run ends with one line saying so,
    not a traceback or a crash."""
    import threading

    src = make_example(tmp_path / "src", "llama", "single")

    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    res = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "o"), "-q"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: could not start another thread: the system's limit on threads or processes is reached "
        "(ulimit -u, the cgroup's pids.max); try fewer --threads or torchrun ranks"]
