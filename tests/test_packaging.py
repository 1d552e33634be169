"""Install layout: the distribution ships only `fp8norm` (kernels/ as fp8norm.kernels, never a bare
`kernels`, which would shadow Hugging Face's package that transformers probes)."""

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fp8norm.kernels

REPO = Path(__file__).resolve().parents[1]


def _top_level(dist) -> set[str]:
    text = dist.read_text("top_level.txt")
    if text is not None:
        return set(text.split())
    return {Path(str(f)).parts[0] for f in dist.files if not str(f).startswith(("..", dist.name))}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel from a clean copy of the tracked sources (no network, no build isolation)."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    src = tmp / "src"
    for rel in files:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp / "dist")], check=True)
    (whl,) = (tmp / "dist").glob("fp8norm-*.whl")
    return whl


def test_wheel_ships_only_fp8norm(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    roots = {n.split("/")[0] for n in names}
    assert roots == {"fp8norm", next(r for r in roots if r.endswith(".dist-info"))}
    assert "fp8norm/kernels/quant_fp8_block.py" in names
    assert not any(n.startswith("kernels/") for n in names)


def test_installed_wheel_imports_fp8norm_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True)
    dists = list(importlib.metadata.distributions(path=[str(target)]))
    assert [d.metadata["Name"] for d in dists] == ["fp8norm"]
    assert _top_level(dists[0]) == {"fp8norm"}
    code = ("import fp8norm.kernels, importlib.util; "
            "print(fp8norm.kernels.__file__); "
            "print(importlib.util.find_spec('kernels'))")
    env = dict(os.environ, PYTHONPATH=str(target), TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    assert Path(out[0]).is_relative_to(target / "fp8norm" / "kernels")
    # no top-level `kernels` came with the wheel (Hugging Face's, installed beside transformers, may be found)
    assert target.as_posix() not in out[1]


def test_wheel_ships_every_subpackage_and_data(wheel, tmp_path):
    """Every package folder of the source tree (a missing entry in pyproject's list would ship a wheel
    whose CLI fails on import) and the examples' tokenizer data are in the wheel, and the installed
    wheel's CLI imports every command's module."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in sorted((REPO / "fp8norm").rglob("__init__.py")):
        assert f"{init.relative_to(REPO).as_posix()}" in names
    assert any(n.startswith("fp8norm/data/tokenizer/") and n.endswith(".json") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", "import fp8norm, fp8norm.cli, fp8norm.shard; print(fp8norm.__file__)"],
                         cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout
    assert Path(out.strip()).is_relative_to(target)


def test_source_checkout_imports_fp8norm_kernels(tmp_path):
    """The editable/source install the tests run on maps kernels/ to fp8norm.kernels, and exposes no
    top-level `kernels` (checked from a neutral folder: run from the repo root, `import kernels` would
    find the folder itself, which is why no code may ever write it)."""
    assert Path(fp8norm.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"
    assert _top_level(importlib.metadata.distribution("fp8norm")) == {"fp8norm"}
    code = ("import fp8norm.kernels, importlib.util; print(fp8norm.kernels.__file__); "
            "s = importlib.util.find_spec('kernels'); print(s and s.origin)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    assert Path(out[0]).resolve() == REPO / "kernels" / "__init__.py"
    assert out[1] == "None" or Path(out[1]).resolve().parent != REPO / "kernels"


def test_no_code_imports_bare_kernels():
    pattern = r"^\s*(from|import) kernels(\.|\s|$)"
    out = subprocess.run(["git", "grep", "-nE", pattern, "--", "*.py"], cwd=REPO, capture_output=True, text=True)
    assert out.stdout == ""


HF_KERNELS_PROBE = ("import kernels, importlib.metadata; print(kernels.__file__); "
                    "print(importlib.metadata.version('kernels')); "
                    "from kernels import get_kernel, LayerRepository; "
                    "import transformers.integrations.hub_kernels; print('transformers ok')")


def test_checkout_root_on_sys_path_leaves_hugging_faces_kernels_alone():
    """`python -m pytest`, `python -m fp8norm` and `torchrun -m fp8norm` started from the checkout root
    put the root on sys.path, where kernels/ looks like a top-level `kernels`: Hugging Face's `kernels`
    (a dependency of transformers >= 5.25) must still be the one imported, and fp8norm must still work."""
    hf = importlib.util.find_spec("kernels", None)
    assert hf is not None, "Hugging Face's kernels is installed with the test extra (transformers needs it)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", HF_KERNELS_PROBE], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    assert Path(out[0]).parent != REPO / "kernels"
    assert out[1] == importlib.metadata.version("kernels")
    assert out[2] == "transformers ok"
    # `python -m` from the root: the same sys.path[0]
    res = subprocess.run([sys.executable, "-m", "fp8norm", "--version"], cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0 and res.stdout.startswith("fp8norm, version"), res.stderr
    code = ("import sys, kernels, fp8norm.kernels; print(kernels.__file__); print(fp8norm.kernels.__file__); "
            "print(sys.modules['kernels'] is not fp8norm.kernels)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True,
                         text=True).stdout.split("\n")
    assert Path(out[0]).parent != REPO / "kernels"
    assert Path(out[1]).resolve() == REPO / "kernels" / "__init__.py"
    assert out[2] == "True"


def test_checkout_root_hands_the_name_to_whichever_kernels_comes_next(tmp_path):
    """The hand-over follows sys.path: a `kernels` package later on the path (here a stand-in) is imported,
    submodules included; with none, `import kernels` fails as if the name did not exist."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'stand-in'\n")
    (fake / "layer.py").write_text("NAME = 'stand-in layer'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import sys; sys.path.insert(1, sys.argv[1]); import kernels.layer, kernels; "
            "print(kernels.WHO, kernels.layer.NAME)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "stand-in stand-in layer"
    # without any other `kernels` (no site-packages: -S), the name does not exist
    res = subprocess.run([sys.executable, "-S", "-c", "import kernels"], cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("ModuleNotFoundError: No module named 'kernels'")


def test_the_commands_import_no_triton_until_a_kernel_is_used():
    """Triton (0.3 s of every start) loads with the first kernel, not with fp8norm.kernels.numerics,
    which every command imports; a kernel module imported by name leaves the function of that name."""
    code = ("import sys, fp8norm.quantize, fp8norm.convert, fp8norm.verify, fp8norm.kernels; "
            "print('triton' in sys.modules); import fp8norm.kernels.quant_mx; "
            "print(fp8norm.kernels.quant_fp8_block.__module__, fp8norm.kernels.quant_mx.__module__, "
            "'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.split() == ["False", "fp8norm.kernels.quant_fp8_block", "fp8norm.kernels.quant_mx", "True"]
