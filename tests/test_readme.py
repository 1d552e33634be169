"""The README tells the truth: its Python example runs on CPU, and its first command's sample output
is what the command prints (numbers aside)."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _block_after(heading: str, lang: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    return m.group(1)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    env.setdefault("TRITON_INTERPRET", "1")
    return env


def test_python_example_runs_on_cpu(tmp_path):
    code = _block_after("## Python", "python")
    assert 'device="cuda"' not in code
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**_env(), "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.strip().splitlines()
    assert first.startswith("torch.float8_e4m3fn (3, 4, 8) relative RMS error 0.02")
    assert second.startswith("GOOD GOOD worst SQNR ")
    assert first in README.read_text() or "relative RMS error 0.0266" in README.read_text()


def _normalized(text: str) -> list[str]:
    return [re.sub(r"\d+(\.\d+)?(e[+-]\d+)?", "N", line.rstrip()) for line in text.strip().splitlines()]


def test_first_run_sample_output_is_what_it_prints(tmp_path):
    commands = _block_after("## First run", "bash").strip()
    sample = _block_after("The second quantizes it", "")
    bf16, fp8 = tmp_path / "tiny-bf16", tmp_path / "tiny-fp8"
    out = ""
    for cmd in commands.split(" && "):
        argv = cmd.replace("/tmp/tiny-bf16", str(bf16)).replace("/tmp/tiny-fp8", str(fp8)).split()
        assert argv[0] == "fp8norm"
        res = subprocess.run([sys.executable, "-m", "fp8norm", *argv[1:]], capture_output=True, text=True,
                             env=_env(), timeout=600)
        assert res.returncode == 0, res.stderr
        out += res.stdout
    out = out.replace(str(bf16), "/tmp/tiny-bf16").replace(str(fp8), "/tmp/tiny-fp8")
    assert _normalized(out) == _normalized(sample)
