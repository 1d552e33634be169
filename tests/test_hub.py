"""Hub model ids as SRC and --reference, offline, against a cache laid out as huggingface_hub lays it
out (models--org--name/{blobs, refs/<branch>, snapshots/<commit>/<file> -> ../../blobs/<hash>}), built
here; the CLI runs in a subprocess with HF_HUB_CACHE and HF_HUB_OFFLINE=1 in its environment."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fp8norm.examples import make_example
from fp8norm.hub import is_repo_id
from tests.ckpt_utils import read_dir, same_bytes
from tests.readers import reader

reader("huggingface_hub")
REPO = Path(__file__).resolve().parents[1]


def add_to_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs=("main",)) -> Path:
    """Put `folder`'s files in the cache as snapshot `commit` of `repo_id`, named by `refs`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


def fp8norm(*args, env, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "fp8norm", *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A cache holding org/tiny (main: model A, branch v2: model B) and org/tiny-fp8 (A quantized)."""
    root = tmp_path_factory.mktemp("hub")
    a = make_example(root / "a", "llama", "single")
    b = make_example(root / "b", "llama", "single", seed=1)
    cache = root / "cache"
    add_to_cache(cache, "org/tiny", a, "a" * 40)
    add_to_cache(cache, "org/tiny", b, "b" * 40, refs=("v2",))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    r = fp8norm("quantize", a, root / "a-fp8", "-q", "--skip-verify", env=env)
    assert r.returncode == 0, r.stderr
    add_to_cache(cache, "org/tiny-fp8", root / "a-fp8", "c" * 40)
    return root, env, a, b


def same_checkpoint(x: Path, y: Path) -> bool:
    tx, ty = read_dir(x), read_dir(y)
    return tx.keys() == ty.keys() and all(same_bytes(tx[k], ty[k]) for k in tx) and \
        (x / "config.json").read_text() == (y / "config.json").read_text()


def test_id_hit_is_the_cached_snapshot(hub, tmp_path):
    root, env, a, _ = hub
    r = fp8norm("quantize", "org/tiny", tmp_path / "o", "-q", "--skip-verify", env=env)
    assert r.returncode == 0, r.stderr
    assert same_checkpoint(tmp_path / "o", root / "a-fp8")


def test_id_miss_offline_is_one_line_naming_it(hub, tmp_path):
    _, env, _, _ = hub
    r = fp8norm("quantize", "org/not-there", tmp_path / "o", "-q", env=env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "org/not-there" in lines[0] and "HF_HUB_OFFLINE" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("revision", ["v2", "b" * 40])
def test_revision_by_branch_or_commit(hub, tmp_path, revision):
    root, env, _, b = hub
    r = fp8norm("quantize", "org/tiny", tmp_path / "o", "-q", "--skip-verify", "--revision", revision, env=env)
    assert r.returncode == 0, r.stderr
    r = fp8norm("quantize", b, tmp_path / "local", "-q", "--skip-verify", env=env)
    assert same_checkpoint(tmp_path / "o", tmp_path / "local")
    assert not same_checkpoint(tmp_path / "o", root / "a-fp8")


def test_reference_by_id(hub, tmp_path):
    root, env, a, _ = hub
    r = fp8norm("plan", a, "--reference", "org/tiny-fp8", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == fp8norm("plan", a, "--reference", root / "a-fp8", env=env).stdout


def test_local_path_wins_over_an_id(hub, tmp_path):
    _, env, _, b = hub
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "tiny").symlink_to(b)  # ./org/tiny exists: it is used, not the cached org/tiny
    r = fp8norm("quantize", "org/tiny", tmp_path / "o", "-q", "--skip-verify", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = fp8norm("quantize", b, tmp_path / "local", "-q", "--skip-verify", env=env)
    assert same_checkpoint(tmp_path / "o", tmp_path / "local")
    r = fp8norm("quantize", "org/tiny", tmp_path / "o2", "--revision", "v2", env=env, cwd=tmp_path)
    assert r.returncode != 0 and "local path" in r.stderr


def test_what_counts_as_an_id():
    assert is_repo_id("Qwen/Qwen3-8B") and is_repo_id("deepseek-ai/DeepSeek-V3.1")
    assert not any(is_repo_id(s) for s in ("Qwen3-8B", "/models/x", "./a/b", "a/b/c", "../x", "a/model.safetensors"))


def test_unreachable_hub_is_one_line_saying_so(hub, tmp_path):
    """Online, with the Hub unreachable (a closed local port as the endpoint) and nothing cached: one line
    that says the Hub could not be reached and that HF_HUB_OFFLINE=1 uses the local cache."""
    root, env, *_ = hub
    env = {**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    env.pop("HF_HUB_OFFLINE")
    r = fp8norm("quantize", "org/absent", tmp_path / "o", "-q", env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("Error: org/absent: not a local path, and the Hugging Face Hub (http://127.0.0.1:9) "
                               "could not be reached to fetch org/absent; with HF_HUB_OFFLINE=1 the local cache ")
    assert not (tmp_path / "o").exists()


def test_without_huggingface_hub_the_extra_is_named(monkeypatch):
    import sys

    from fp8norm.hub import HubError, resolve

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(HubError, match=r"^org/x: not a local path; Hub model ids need huggingface_hub: "
                                       r"pip install 'fp8norm\[hub\]'$"):
        resolve("org/x")
