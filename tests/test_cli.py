"""The CLI is a thin layer: `fp8norm demo` reports what the library computed."""

import subprocess
import sys

from click.testing import CliRunner

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
