"""tools/setup.sh and tools/run_tests.sh on a copy of the checkout, with pip replaced by a recorder
(setup.sh's FP8NORM_PIP hook) and the CPU torch index pointed at 127.0.0.1: where they install, how
they get torch, what they say. Nothing is downloaded."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"

# Stands in for `PYTHON -m pip install ARGS`: appends [PYTHON, *ARGS] to $PIP_LOG and, for an install
# of fp8norm itself, leaves the metadata setup.sh reads its version from.
RECORDING_PIP = """\
import json, os, subprocess, sys
from pathlib import Path

python, _install, *args = sys.argv[1:]
with open(os.environ["PIP_LOG"], "a") as log:
    log.write(json.dumps([python, *args]) + "\\n")
if "." in args or "-e" in args:
    site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   text=True).strip()
    dist = Path(site, "fp8norm-0.1.0.dist-info")
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\\nName: fp8norm\\nVersion: 0.1.0\\n")
"""

# Stands in for pytest inside a test environment: records which interpreter ran it with which arguments.
RECORDING_PYTEST = """\
import json, os, sys
with open(os.environ["PYTEST_LOG"], "w") as log:
    json.dump([sys.executable, sys.argv[1:]], log)
sys.exit(int(os.environ["PYTEST_RC"]))
"""


def _base_python() -> str:
    """An interpreter that is not a virtual environment (the one this test's venv was made from)."""
    base = getattr(sys, "_base_executable", sys.executable)
    in_venv = subprocess.run([base, "-c", "import sys; print(sys.prefix != sys.base_prefix)"],
                             capture_output=True, text=True).stdout.strip()
    if in_venv != "False":
        pytest.skip(f"no interpreter outside a virtual environment ({base})")
    return base


def _has_torch(python: str, env=None) -> bool:
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"
    return subprocess.run([python, "-c", code], env=env).returncode == 0


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/whl/cpu"


@pytest.fixture
def index_server():
    """start(status) -> (index URL, the paths requested): a local stand-in for the CPU torch index."""
    servers = []

    def start(status: int):
        requested = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                requested.append(self.path)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/whl/cpu", requested

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def checkout(tmp_path):
    """A copy of the tracked files, as a fresh git repository (untracked: everything)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    copy = tmp_path / "checkout"
    for name in filter(None, listed.stdout.split("\0")):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    return copy


class Runner:
    def __init__(self, checkout: Path, tmp_path: Path):
        self.checkout = checkout
        self.pip_log = tmp_path / "pip.log"
        self.stub_bin = tmp_path / "bin"
        self.stub_bin.mkdir()
        pip = tmp_path / "recording_pip"
        pip.write_text(f"#!{sys.executable}\n{RECORDING_PIP}")
        pip.chmod(0o755)
        # built from scratch: no proxy (127.0.0.1 must be reached directly), no active environment
        self.env = {"PATH": f"{self.stub_bin}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
                    "LANG": "C.UTF-8", "FP8NORM_PIP": str(pip), "PIP_LOG": str(self.pip_log),
                    "FP8NORM_TORCH_INDEX": _closed_port_url()}

    def run(self, script: str, *args: str, **env) -> subprocess.CompletedProcess:
        return subprocess.run([f"tools/{script}", *args], cwd=self.checkout, env={**self.env, **env},
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

    def pip_calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.pip_log.read_text().splitlines()]

    def torch_installs(self) -> list[list[str]]:
        return [call for call in self.pip_calls() if TORCH in call]

    def no_gpu(self):
        if shutil.which("nvidia-smi", path=self.env["PATH"]):
            pytest.skip("nvidia-smi is on PATH: setup.sh takes the GPU branch")


@pytest.fixture
def runner(checkout, tmp_path):
    return Runner(checkout, tmp_path)


@pytest.fixture
def test_venv(tmp_path):
    """A virtual environment outside the checkout, without pip (pip is the recorder)."""
    env = tmp_path / "env"
    subprocess.run([_base_python(), "-m", "venv", "--without-pip", str(env)], check=True)
    return env


def _lines(res) -> list[str]:
    return res.stdout.splitlines()


def test_help_lists_the_options_and_the_developer_hook(runner):
    res = runner.run("setup.sh", "--help")
    assert res.returncode == 0, res.stderr
    for option in ("--dev", "--venv DIR", "--system", "PYTHON=", "FP8NORM_TORCH_INDEX=URL", "FP8NORM_PIP=CMD"):
        assert option in res.stdout
    assert "developer hook" in res.stdout
    bad = runner.run("setup.sh", "--bogus")
    assert (bad.returncode, bad.stderr) == (2, "setup.sh: unknown argument --bogus (see --help)\n")


def test_a_plain_interpreter_gets_dotvenv_in_the_checkout(runner):
    base = _base_python()
    if _has_torch(base):
        pytest.skip(f"{base} has torch: the venv is made with the system site packages")
    runner.no_gpu()
    git_status = ["git", "status", "--porcelain", "--untracked-files=all"]
    status_before = subprocess.run(git_status, cwd=runner.checkout, capture_output=True, text=True).stdout

    res = runner.run("setup.sh", "--dev", PYTHON=base)
    assert res.returncode == 0, res.stderr
    venv = runner.checkout / ".venv"
    assert "setup.sh: creating the virtual environment .venv (without the system site packages)" in _lines(res)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    assert [call[0] for call in runner.pip_calls()] == [str(venv / "bin" / "python")] * 2
    assert runner.pip_calls()[1][1:] == ["-e", ".[test]"]
    assert _lines(res)[-1] == ("setup.sh: done: fp8norm 0.1.0 in .venv; try: .venv/bin/fp8norm --help, "
                               "or activate it (. .venv/bin/activate) and run fp8norm --help")
    assert "./fp8norm" not in res.stdout
    # .venv is git-ignored
    assert subprocess.run(git_status, cwd=runner.checkout, capture_output=True, text=True).stdout == status_before

    again = runner.run("setup.sh", PYTHON=base)
    assert again.returncode == 0, again.stderr
    assert "setup.sh: using the existing virtual environment .venv" in _lines(again)
    assert runner.pip_calls()[-1][1:] == ["."]


def test_a_plain_interpreter_with_torch_keeps_it_visible(runner, tmp_path):
    fake_site = tmp_path / "fake_site"
    (fake_site / "torch").mkdir(parents=True)
    (fake_site / "torch" / "__init__.py").write_text("from . import version\n__version__ = '2.13.0'\n")
    (fake_site / "torch" / "version.py").write_text("cuda = None\n")
    base = _base_python()

    res = runner.run("setup.sh", PYTHON=base, PYTHONPATH=str(fake_site))
    assert res.returncode == 0, res.stderr
    assert (f"setup.sh: creating the virtual environment .venv with the system site packages visible "
            f"({base} has torch: kept)") in _lines(res)
    assert "include-system-site-packages = true" in (runner.checkout / ".venv" / "pyvenv.cfg").read_text()
    assert "setup.sh: torch 2.13.0 (CPU build) is installed: kept" in _lines(res)
    assert runner.torch_installs() == []


def test_an_unreachable_index_is_said_in_one_line_and_pip_uses_its_default_index(runner, test_venv):
    runner.no_gpu()
    index = runner.env["FP8NORM_TORCH_INDEX"]
    res = runner.run("setup.sh", PYTHON=str(test_venv / "bin" / "python"))
    assert res.returncode == 0, res.stderr
    said = [line for line in _lines(res) if "CPU index" in line]
    assert len(said) == 1
    assert said[0].startswith(f"setup.sh: no torch and no NVIDIA GPU; the CPU index {index} is unreachable (")
    assert said[0].endswith("): installing torch==2.13.0 from pip's default index instead (a local wheel cache "
                            "or mirror gives the CPU build, public PyPI the multi-GB CUDA build; for the CPU "
                            "wheel set FP8NORM_TORCH_INDEX to a reachable copy of the CPU index)")
    assert runner.torch_installs() == [[str(test_venv / "bin" / "python"), TORCH]]


def setup_with_index(runner, test_venv, index_server, status: int):
    """setup.sh on a machine without GPU or torch, its CPU index a local server answering `status`;
    the index must be probed exactly once."""
    runner.no_gpu()
    index, requested = index_server(status)
    res = runner.run("setup.sh", PYTHON=str(test_venv / "bin" / "python"), FP8NORM_TORCH_INDEX=index)
    assert res.returncode == 0, res.stderr
    assert requested == ["/whl/cpu/torch/"]
    return index, res


def test_an_index_answering_with_an_error_is_probed_once(runner, test_venv, index_server):
    index, res = setup_with_index(runner, test_venv, index_server, 404)
    assert f"the CPU index {index} is unreachable (HTTP 404): installing torch==2.13.0" in res.stdout
    assert runner.torch_installs() == [[str(test_venv / "bin" / "python"), TORCH]]


def test_a_reachable_index_is_used(runner, test_venv, index_server):
    index, res = setup_with_index(runner, test_venv, index_server, 200)
    assert f"setup.sh: no torch and no NVIDIA GPU: installing the CPU wheel torch==2.13.0 from {index}" in _lines(res)
    assert runner.torch_installs() == [[str(test_venv / "bin" / "python"), TORCH, "--index-url", index,
                                        "--retries", "0", "--timeout", "30"]]


def test_an_nvidia_gpu_gets_pypis_cuda_build_without_a_probe(runner, test_venv, index_server):
    index, requested = index_server(200)
    (runner.stub_bin / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (runner.stub_bin / "nvidia-smi").chmod(0o755)
    res = runner.run("setup.sh", PYTHON=str(test_venv / "bin" / "python"), FP8NORM_TORCH_INDEX=index)
    assert res.returncode == 0, res.stderr
    assert requested == []
    assert ("setup.sh: no torch; an NVIDIA GPU is present: installing torch==2.13.0 from PyPI "
            "(CUDA build, several GB)") in _lines(res)
    assert runner.torch_installs() == [[str(test_venv / "bin" / "python"), TORCH]]


def test_inside_a_venv_nothing_is_created(runner, test_venv):
    python = str(test_venv / "bin" / "python")
    res = runner.run("setup.sh", PYTHON=python)
    assert res.returncode == 0, res.stderr
    assert f"setup.sh: {python} runs in the virtual environment {test_venv}: installing there" in _lines(res)
    assert not (runner.checkout / ".venv").exists()
    assert {call[0] for call in runner.pip_calls()} == {python}
    assert _lines(res)[-1] == (f"setup.sh: done: fp8norm 0.1.0 in {test_venv}; try: {test_venv}/bin/fp8norm "
                               f"--help, or activate it (. {test_venv}/bin/activate) and run fp8norm --help")

    active = runner.run("setup.sh", PYTHON=python, VIRTUAL_ENV=str(test_venv))
    assert _lines(active)[-1] == f"setup.sh: done: fp8norm 0.1.0 in the active {test_venv}; try: fp8norm --help"


def test_system_installs_into_the_interpreter_itself(runner, test_venv):
    python = str(test_venv / "bin" / "python")
    res = runner.run("setup.sh", "--system", PYTHON=python)
    assert res.returncode == 0, res.stderr
    assert "setup.sh: installing into the interpreter itself (--system), not a virtual environment" in _lines(res)
    assert not (runner.checkout / ".venv").exists()
    assert _lines(res)[-1] == f"setup.sh: done: fp8norm 0.1.0; try: {test_venv}/bin/fp8norm --help"


def test_a_folder_that_is_not_a_venv_is_refused(runner, tmp_path):
    (tmp_path / "notenv").mkdir()
    (tmp_path / "notenv" / "data.txt").write_text("x")
    res = runner.run("setup.sh", "--venv", str(tmp_path / "notenv"))
    assert res.returncode == 2
    assert res.stderr == (f"setup.sh: {tmp_path}/notenv exists but is not a virtual environment (no bin/python): "
                          "remove it or pick another folder with --venv DIR\n")
    assert not runner.pip_log.exists()


def test_run_tests_uses_the_python_setup_installed_into(runner, test_venv, tmp_path):
    python = str(test_venv / "bin" / "python")
    site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   text=True).strip()
    (Path(site) / "pytest").mkdir()
    (Path(site) / "pytest" / "__init__.py").write_text("")
    (Path(site) / "pytest" / "__main__.py").write_text(RECORDING_PYTEST)
    pytest_log = tmp_path / "pytest.json"

    res = runner.run("run_tests.sh", "-k", "numerics", PYTHON=python, PYTEST_LOG=str(pytest_log), PYTEST_RC="0")
    assert res.returncode == 0, res.stderr
    assert runner.pip_calls()[-1] == [python, "-e", ".[test]"]
    assert json.loads(pytest_log.read_text()) == [python, ["-n", "2", "-k", "numerics"]]  # both cores

    none = runner.run("run_tests.sh", PYTHON=python, PYTEST_LOG=str(pytest_log), PYTEST_RC="5")
    assert none.returncode == 1
    assert none.stderr.endswith("run_tests: pytest collected no tests: failing\n")
