"""The CLI is a thin layer: `fp8norm demo` reports what the library computed."""

import subprocess
import sys

from click.testing import CliRunner

from fp8norm import __version__
from fp8norm.cli import main
from fp8norm.demo import kernel_demo


def test_demo_function_checks_backends_and_error_bound():
    r = kernel_demo((130, 260), "ue8m0", backends=("torch", "triton"))
    assert r.bit_exact and r.scale_inv_shape == (2, 3)
    assert 2.0 ** -5 < r.max_rel_error <= 2.0 ** -4  # e4m3's half-ulp bound, and it is reached


def test_demo_command_prints_result():
    out = CliRunner().invoke(main, ["demo", "--shape", "130x260", "--scale-fmt", "ue8m0"])
    assert out.exit_code == 0, out.output
    assert "bf16 130x260 -> e4m3 + scale_inv 2x3 (ue8m0 scales" in out.output
    assert "torch, triton: bit-exact" in out.output


def test_demo_rejects_bad_shape():
    out = CliRunner().invoke(main, ["demo", "--shape", "12"])
    assert out.exit_code == 2 and "expected 2 or 3 positive sizes" in out.output


def test_help_has_examples_and_python_m_works():
    out = subprocess.run([sys.executable, "-m", "fp8norm", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "Example:" in out.stdout and "fp8norm demo --shape" in out.stdout


def test_shard_mcore_and_unshard_round_trip_through_the_cli(tmp_path):
    from fp8norm.examples import make_example
    from tests.ckpt_utils import read_dir, same_bytes

    src = make_example(tmp_path / "src", "qwen3-moe", "sharded")
    run = CliRunner().invoke
    res = run(main, ["shard", str(src), str(tmp_path / "mc"), "--layout", "mcore", "--pp", "2", "--ep", "2"])
    assert res.exit_code == 0, res.output
    ranks = sorted(p.name for p in (tmp_path / "mc" / "iter_0000000").iterdir())
    assert ranks == ["mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_00_001_000", "mp_rank_00_001_001"]
    res = run(main, ["unshard", str(tmp_path / "mc"), str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    a, b = read_dir(src), read_dir(tmp_path / "back")
    assert set(a) == set(b) and all(same_bytes(a[k], b[k]) for k in a)
    res = run(main, ["shard", str(src), str(tmp_path / "bad"), "--layout", "mcore", "--tp", "3"])
    assert res.exit_code == 1 and "Traceback" not in res.output and not (tmp_path / "bad").exists()
    assert "not divisible by 3" in res.output


def test_examples_shard_block_aligned_fp8_at_tp2_ep2(tmp_path):
    """The examples' sizes (16 heads, 8 kv heads of 128, hidden/intermediate multiples of 256) let FP8
    split on 128x128 tiles: tp 2 x ep 2 and back without --requant, byte-identical, verify GOOD."""
    import torch

    from fp8norm.examples import make_example
    from tests.ckpt_utils import cli, read_dir, same_bytes

    src = make_example(tmp_path / "src", "qwen3-moe", "sharded")
    cli("quantize", src, tmp_path / "fp8", "-q")
    res = cli("shard", tmp_path / "fp8", tmp_path / "mc", "--layout", "mcore", "--tp", "2", "--ep", "2")
    assert "requant" not in res.output.lower() or "0 requantized" in res.output.lower()
    cli("unshard", tmp_path / "mc", tmp_path / "back")
    a, b = read_dir(tmp_path / "fp8"), read_dir(tmp_path / "back")
    assert set(a) == set(b) and all(same_bytes(a[k], b[k]) for k in a)
    res = cli("verify", src, tmp_path / "back", "--all")
    n_fp8 = sum(t.dtype == torch.float8_e4m3fn for t in b.values())
    assert f"  All {n_fp8} FP8 tensors checked: all GOOD.\n" in res.output


def _run_entry(*args: str) -> subprocess.CompletedProcess:
    """fp8norm.cli.run (the console script) in a fresh interpreter with an atexit hook that prints:
    the hook runs only where the interpreter's teardown does."""
    script = ("import atexit, sys\natexit.register(lambda: print('teardown ran'))\n"
              f"sys.argv = ['fp8norm', *{list(args)!r}]\nfrom fp8norm.cli import run\nrun()\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_a_command_that_loaded_torch_skips_the_teardown_with_its_exit_code_and_all_its_output(tmp_path):
    from fp8norm.examples import make_example

    src = make_example(tmp_path / "src", "llama", "single")
    done = _run_entry("quantize", str(src), str(tmp_path / "fp8"), "-q")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("load ") and "teardown ran" not in lines  # every line out, no teardown
    assert (tmp_path / "fp8" / "model.safetensors.index.json").is_file()
    failed = _run_entry("quantize", str(src), str(tmp_path / "fp8"), "-q")  # DST exists: refused, exit 1
    assert failed.returncode == 1 and "Error: " in failed.stderr and "exists and is not empty" in failed.stderr, failed.stderr
    # a command that never loads torch leaves the ordinary way (its exit code too)
    version = _run_entry("--version")
    assert version.returncode == 0 and version.stdout.splitlines() == [f"fp8norm, version {__version__}", "teardown ran"]
    usage = _run_entry("quantize")
    assert usage.returncode == 2 and usage.stdout == "teardown ran\n"


def test_a_profiled_run_leaves_the_ordinary_way_so_the_profile_is_written(tmp_path):
    from fp8norm.examples import make_example

    src = make_example(tmp_path / "src", "llama", "single")
    prof = tmp_path / "run.prof"
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "fp8norm", "quantize", str(src),
                           str(tmp_path / "fp8"), "-q"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    import pstats

    assert any(name == "run" for _, _, name in pstats.Stats(str(prof)).stats)  # fp8norm.cli.run was profiled
