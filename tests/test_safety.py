"""DST safety for every writing command: identity not paths, one run per DST, --overwrite only once a
run can start, resume that notices changed sources and damaged outputs.

Each test checks the exit code, the one `Error:` line naming the culprit, the source before and after
(bytes and mtimes) and what DST holds.
"""

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash
from click.testing import CliRunner
from safetensors.torch import save_file

import fp8norm.output
import fp8norm.pipeline
import fp8norm.quantize
import fp8norm.verify
from fp8norm.cli import main
from fp8norm.examples import make_example
from fp8norm.output import LOCK_NAME, MANIFEST_NAME
from tests.ckpt_utils import (cli, fail_quantize_at, interrupt_when_paused, one_line_error, tree_bytes,
                              wait_for_pause)

SHARD = "300KB"


def snapshot(path: Path) -> dict:
    """Every file under `path` (hidden and partial ones too) with its sha256 and mtime."""
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def src(tmp_path):
    return make_example(tmp_path / "src", "llama", "sharded", shards=2)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A source and its complete quantized output (the byte-for-byte reference)."""
    root = tmp_path_factory.mktemp("clean")
    s = make_example(root / "src", "llama", "sharded", shards=2)
    cli("quantize", s, root / "out", "--max-shard-size", SHARD, "--skip-verify")
    assert len(list((root / "out").glob("model-*.safetensors"))) >= 3
    return s, root / "out"


# ---------------------------------------------------------------- identity, not path strings

def test_dst_is_src_or_inside_it_through_a_symlink(src, tmp_path):
    before = snapshot(src)
    (tmp_path / "link").symlink_to(src)
    for dst in (tmp_path / "link", tmp_path / "link" / "out"):
        one_line_error(cli("quantize", src, dst, "--overwrite", ok=False), str(dst), "may not be the source")
    assert snapshot(src) == before


def test_src_inside_dst_is_refused_even_with_overwrite(tmp_path):
    s = make_example(tmp_path / "box" / "src", "llama", "single")
    before = snapshot(tmp_path / "box")
    one_line_error(cli("quantize", s, tmp_path / "box", "--overwrite", ok=False), "may not contain the source")
    (tmp_path / "via").symlink_to(s)  # SRC named through a symlink elsewhere
    one_line_error(cli("repack", tmp_path / "via", tmp_path / "box", "--overwrite", ok=False),
                   "may not contain the source")
    assert snapshot(tmp_path / "box") == before


@pytest.fixture
def bind(tmp_path):
    """bind(a, b): mount --bind a b, undone after the test (skipped where mounting is refused)."""
    mounted = []

    def do(a: Path, b: Path) -> Path:
        b.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "--bind", str(a), str(b)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"mount --bind refused here ({res.stderr.strip()}): needs root")
        mounted.append(b)
        return b

    yield do
    for b in reversed(mounted):
        subprocess.run(["umount", str(b)], check=True)


def test_dst_bind_mount_of_src_with_overwrite_keeps_the_source(src, tmp_path, bind):
    """The reported loss: DST a second mount of SRC, --overwrite deleted the source."""
    before = snapshot(src)
    mnt = bind(src, tmp_path / "mnt")
    line = one_line_error(cli("quantize", src, mnt, "--overwrite", ok=False), str(mnt), "may not be the source")
    assert "the same directory through a link or mount" in line
    one_line_error(cli("quantize", src, mnt / "out", ok=False), "may not be the source")
    assert not (src / "out").exists() and snapshot(src) == before


def test_src_bind_mounted_from_inside_dst(tmp_path, bind):
    s = make_example(tmp_path / "box" / "src", "llama", "single")
    before = snapshot(tmp_path / "box")
    mnt = bind(s, tmp_path / "elsewhere" / "src")  # SRC path shows no relation to DST
    for cmd in (["quantize"], ["shard", "--layout", "deepseek", "--mp", "1", "--n-experts", "0"]):
        one_line_error(cli(cmd[0], mnt, tmp_path / "box", *cmd[1:], "--overwrite", ok=False),
                       "may not contain the source")
    assert snapshot(tmp_path / "box") == before


# ---------------------------------------------------------------- one run per DST

def _hold_lock(dst: Path) -> int:
    dst.mkdir(parents=True, exist_ok=True)
    fd = os.open(dst / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _interrupted(src, dst, monkeypatch, at=15):
    """A quantize run that failed after some shards were finished (its manifest lists them)."""
    heal = fail_quantize_at(monkeypatch, at)
    res = cli("quantize", src, dst, "--max-shard-size", SHARD, "--skip-verify", ok=False)
    heal()
    assert res.exit_code == 1 and "injected crash" in res.output
    done = json.loads((dst / MANIFEST_NAME).read_text())["done"]
    assert done and not (dst / "model.safetensors.index.json").exists()
    return done


WRITERS = {
    "quantize": ["quantize", "{src}", "{dst}"],
    "repack": ["repack", "{src}", "{dst}"],
    "convert": ["convert", "{fp8}", "{dst}", "--to", "bf16"],
    "shard-deepseek": ["shard", "{src}", "{dst}", "--layout", "deepseek", "--mp", "2", "--n-experts", "0"],
    "shard-mcore": ["shard", "{src}", "{dst}", "--layout", "mcore", "--pp", "2"],
    "unshard": ["unshard", "{mcore}", "{dst}"],
}


@pytest.mark.parametrize("command", list(WRITERS))
@pytest.mark.parametrize("flag", ["--resume", "--overwrite", None])
def test_every_writing_command_respects_the_lock(clean, tmp_path, command, flag):
    s, fp8 = clean
    mcore = tmp_path / "mcore"
    if command == "unshard":
        cli("shard", s, mcore, "--layout", "mcore", "--pp", "2")
    dst = tmp_path / "dst"
    fd = _hold_lock(dst)
    (dst / "other-run-file.bin").write_bytes(b"x" * 10)
    (dst / ".model-00001-of-00003.safetensors.partial").write_bytes(b"y" * 10)  # the other run's file
    before, src_before = snapshot(dst), snapshot(s)
    args = [a.format(src=s, dst=dst, fp8=fp8, mcore=mcore) for a in WRITERS[command]] + ([flag] if flag else [])
    one_line_error(cli(*args, ok=False), str(dst), f"another fp8norm run (pid {os.getpid()}) is writing here")
    assert snapshot(dst) == before and snapshot(s) == src_before
    os.close(fd)


def _subprocess_run(src, dst, *extra, env=None):
    cmd = [sys.executable, "-m", "fp8norm", "quantize", str(src), str(dst), "--max-shard-size", SHARD,
           "--skip-verify", "-q", *extra]
    return subprocess.Popen(cmd, env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _count_points(src, tmp_path) -> int:
    counter = tmp_path / "points"
    p = _subprocess_run(src, tmp_path / "count", env={"FP8NORM_COUNT_POINTS": str(counter)})
    assert p.wait() == 0, p.stderr.read()
    return int(counter.read_text())


@pytest.mark.parametrize("pause", ["text-renamed:1", "tensor-written:3", "shard-renamed:1", "shard-renamed:2"],
                         ids=["prepared", "mid-shard", "shard-renamed-not-recorded", "between-shards"])
def test_two_runs_on_one_dst(clean, tmp_path, pause):
    """Run A pauses at a chosen moment (DST just prepared, a shard half-written, a shard renamed but not
    yet in the manifest, between shards); every run B on the same DST (--resume, --overwrite, plain)
    is refused without touching A's files; A then finishes byte-identical to a run alone."""
    s, out = clean
    dst, flag = tmp_path / "dst", tmp_path / "paused"
    a = _subprocess_run(s, dst, env={"FP8NORM_PAUSE_AT": pause, "FP8NORM_PAUSE_FILE": str(flag)})
    try:
        wait_for_pause(flag, a)
        before = snapshot(dst)
        assert any(name.endswith(".partial") for name in before) == (pause == "tensor-written:3")
        for extra in (["--resume"], ["--overwrite"], []):
            one_line_error(cli("quantize", s, dst, "--max-shard-size", SHARD, "--skip-verify", *extra, ok=False),
                           f"another fp8norm run (pid {a.pid}) is writing here")
            assert snapshot(dst) == before
        flag.unlink()
        assert a.wait(timeout=300) == 0, a.stderr.read()
    finally:
        if a.poll() is None:
            a.kill()
    assert tree_bytes(dst) == tree_bytes(out) and not (dst / LOCK_NAME).exists()
    # A finished: the lock is free again, and a --resume of the complete output changes nothing
    cli("quantize", s, dst, "--max-shard-size", SHARD, "--skip-verify", "--resume")
    assert tree_bytes(dst) == tree_bytes(out)


def test_lock_of_a_killed_run_does_not_block_resume(clean, tmp_path):
    s, out = clean
    n = _count_points(s, tmp_path)
    a = _subprocess_run(s, tmp_path / "dst", env={"FP8NORM_KILL_AT": str(n // 2)})
    assert a.wait() == -9
    assert (tmp_path / "dst" / LOCK_NAME).exists()  # left behind, but no process holds it
    cli("quantize", s, tmp_path / "dst", "--max-shard-size", SHARD, "--skip-verify", "--resume")
    assert tree_bytes(tmp_path / "dst") == tree_bytes(out)


# ---------------------------------------------------------------- Ctrl-C: what DST holds, how to go on

@pytest.mark.parametrize("pause,extra", [("tensor-written:3", []), ("shard-renamed:2", ["--overwrite"]),
                                         ("text-renamed:1", [])],
                         ids=["mid-shard", "overwrite-shard-renamed", "preparing"])
def test_ctrl_c_keeps_finished_shards_and_prints_the_command_that_goes_on(clean, tmp_path, pause, extra):
    """SIGINT to a real run held at a pause point: exit 130, two lines (what DST holds, the command with
    --resume and without --overwrite), DST holds the finished shards and the manifest only; the printed
    command, run as printed, ends byte-identical to a run alone."""
    s, out = clean
    dst, flag = tmp_path / "dst", tmp_path / "paused"
    run = _subprocess_run(s, dst, *extra, env={"FP8NORM_PAUSE_AT": pause, "FP8NORM_PAUSE_FILE": str(flag)})
    held, stdout, stderr = interrupt_when_paused(run, flag, lambda: snapshot(dst))
    assert run.returncode == 130, stderr
    assert any(name.endswith(".partial") for name in held) == (pause == "tensor-written:3")
    done = json.loads((dst / MANIFEST_NAME).read_text())["done"]
    assert {p.name for p in dst.iterdir()} == {MANIFEST_NAME, *done}  # no partial file, no lock
    shards = len(list(out.glob("model-*.safetensors")))
    given = ["quantize", str(s), str(dst), "--max-shard-size", SHARD, "--skip-verify", "-q", *extra]
    resume = [a for a in given if a != "--overwrite"] + ["--resume"]
    if pause == "text-renamed:1":
        assert done == {}
        holds = f"{dst} was being prepared; this run wrote nothing yet"
    else:
        assert 0 < len(done) < shards
        holds = (f"{len(done)} of {shards} output file(s) are finished and kept in {dst} (listed in "
                 f"{MANIFEST_NAME}); no partly written file is left")
    assert stdout == ""
    assert stderr.splitlines() == [f"Interrupted: {holds}.", f"Continue with: python -m fp8norm {shlex.join(resume)}"]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `python` is this interpreter
    res = subprocess.run(stderr.splitlines()[1].removeprefix("Continue with: "), shell=True, capture_output=True,
                         text=True, env=dict(os.environ, PATH=path), timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"({shards - len(done)} shard(s) written, {len(done)} already done)" in res.stdout
    assert tree_bytes(dst) == tree_bytes(out)


def test_ctrl_c_before_writing_after_the_output_is_complete_and_outside_writing(clean, tmp_path, monkeypatch):
    s, out = clean

    def interrupt(*_args, **_kw):
        raise KeyboardInterrupt

    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args], prog_name="fp8norm")

    dst = tmp_path / "dst"
    shutil.copytree(out, dst)
    before = snapshot(dst)
    monkeypatch.setattr(fp8norm.quantize, "plan", interrupt)  # while planning: DST not yet touched
    res = invoke("quantize", s, dst, "--overwrite")
    assert res.exit_code == 130
    assert res.output.splitlines() == ["Interrupted before anything was written to the output directory.",
                                       f"Run again: fp8norm quantize {s} {dst} --overwrite"]
    assert snapshot(dst) == before
    monkeypatch.undo()
    monkeypatch.setattr(fp8norm.pipeline.RunSummary, "format", interrupt)  # while its summary is printed
    res = invoke("quantize", s, tmp_path / "new", "--max-shard-size", SHARD, "--skip-verify")
    assert res.exit_code == 130
    assert res.output.splitlines() == ["Interrupted after the output was complete: nothing to continue."]
    assert tree_bytes(tmp_path / "new") == tree_bytes(out)
    monkeypatch.setattr(fp8norm.verify, "verify", interrupt)  # a command that writes no DST
    res = invoke("verify", s, out)
    assert res.exit_code == 130 and res.output == "Interrupted.\n"


def test_resumed_run_reports_and_verifies_the_whole_output(clean, tmp_path, monkeypatch):
    """A run resumed after some shards were done reports the counts and the verification of a clean run
    (samples from every shard, not only those written now)."""
    s, _ = clean
    whole = cli("quantize", s, tmp_path / "whole", "--max-shard-size", SHARD).output
    done = _interrupted(s, tmp_path / "dst", monkeypatch)
    resumed = cli("quantize", s, tmp_path / "dst", "--max-shard-size", SHARD, "--resume").output
    shards = len(list((tmp_path / "whole").glob("model-*.safetensors")))

    def box(text):
        return text[text.index("=" * 72):text.rindex("=" * 72)]

    assert box(resumed) == box(whole)  # the same tensors checked, the same figures and verdict
    # the llama example: 2 layers of 7 linears quantized, 7 other tensors; at most 2 FP8 tensors a shard
    for line in ("FP8 weight tensors  : 14", "Kept tensors        : 7", "Checked             : 14  (GOOD 14 ",
                 "All 14 FP8 tensors checked: all GOOD."):
        assert f"\n  {line}" in resumed, line
    assert resumed.splitlines()[0] == whole.splitlines()[0] + " in the whole output"
    assert f"now ({shards - len(done)} shard(s) written, {len(done)} already done)" in resumed


# ---------------------------------------------------------------- --overwrite only once the run can start

def test_overwrite_keeps_the_old_output_when_the_new_run_cannot_start(clean, tmp_path, monkeypatch):
    s, out = clean
    dst = tmp_path / "dst"
    cli("quantize", s, dst, "--max-shard-size", SHARD, "--skip-verify")
    before = snapshot(dst)
    bad = make_example(tmp_path / "bad", "llama", "sharded", shards=2)
    (bad / "config.json").write_text("[1, 2]")  # found only after planning
    one_line_error(cli("quantize", bad, dst, "--overwrite", ok=False), str(bad / "config.json"), "JSON object")
    one_line_error(cli("quantize", s, dst, "--overwrite", "--device", "foo", ok=False), "--device", exit_code=2)
    fd = _hold_lock(dst)
    one_line_error(cli("quantize", s, dst, "--overwrite", ok=False), "another fp8norm run")
    os.close(fd)
    (dst / LOCK_NAME).unlink()
    # not enough space to build the new output beside the old one
    monkeypatch.setattr(fp8norm.output.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    one_line_error(cli("repack", s, dst, "--overwrite", ok=False), str(dst), "that needs", "1,000 are free",
                   f"remove {dst} yourself and run again without --overwrite")
    assert snapshot(dst) == before
    monkeypatch.undo()
    cli("repack", s, dst, "--overwrite")  # a run that can start does replace it
    assert not list(dst.glob("*.partial")) and (dst / "model.safetensors.index.json").exists()
    assert "fp8norm.json" not in {p.name for p in dst.iterdir()}  # nothing of the old output is left


# ---------------------------------------------------------------- resume: source identity, damaged outputs

def _rewrite_same_shape(path: Path, scale: float) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    size = path.stat().st_size
    save_file({k: (v * scale).to(v.dtype) if v.is_floating_point() else v for k, v in tensors.items()}, str(path),
              metadata=meta)
    assert path.stat().st_size == size


def test_manifest_records_sources_and_output_digests(clean):
    s, out = clean
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["complete"] is True
    for rel, rec in m["sources"].items():
        st = (s / rel).stat()
        assert rec == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    assert set(m["sources"]) == {p.name for p in s.glob("*.safetensors")}
    assert set(m["done"]) == {p.name for p in out.glob("model-*.safetensors")}
    for name, rec in m["done"].items():
        assert rec["size"] == (out / name).stat().st_size
        assert rec["digest"] == xxhash.xxh3_128((out / name).read_bytes()).hexdigest()
        assert set(rec["inputs"]) <= set(m["sources"]) and rec["inputs"]
    assert m["digest"] == "xxh3-128"


@pytest.mark.parametrize("kind", [None, "sha256"])
def test_resume_refuses_a_manifest_with_other_digests(tmp_path, monkeypatch, kind):
    """A manifest from before XXH3 (no `digest` field: sha256) or of another kind: one line, DST untouched."""
    s = make_example(tmp_path / "src", "llama", "sharded", shards=2)
    dst = tmp_path / "dst"
    _interrupted(s, dst, monkeypatch)
    m = json.loads((dst / MANIFEST_NAME).read_text())
    del m["digest"]
    if kind is not None:
        m["digest"] = kind
    (dst / MANIFEST_NAME).write_text(json.dumps(m))
    before = snapshot(dst)
    one_line_error(cli("quantize", s, dst, "--max-shard-size", SHARD, "--skip-verify", "--resume", ok=False),
                   f"{dst / MANIFEST_NAME}: records sha256 digests", "--overwrite")
    assert snapshot(dst) == before


def test_resume_refuses_a_changed_source(tmp_path, monkeypatch):
    s = make_example(tmp_path / "src", "llama", "sharded", shards=2)
    dst = tmp_path / "dst"
    _interrupted(s, dst, monkeypatch)
    before = snapshot(dst)
    _rewrite_same_shape(s / "model-00001-of-00002.safetensors", 2.0)  # same names, shapes, size; other values
    one_line_error(cli("quantize", s, dst, "--max-shard-size", SHARD, "--skip-verify", "--resume", ok=False),
                   str(s / "model-00001-of-00002.safetensors"), "source changed", "--overwrite")
    assert snapshot(dst) == before
    with open(s / "model-00002-of-00002.safetensors", "ab") as f:  # another size: refused without reading
        f.write(b"\0" * 8)
    one_line_error(cli("quantize", s, dst, "--max-shard-size", SHARD, "--skip-verify", "--resume", ok=False),
                   "model-0000")
    assert snapshot(dst) == before


def test_resume_accepts_a_source_copied_with_new_mtimes(clean, tmp_path, monkeypatch):
    s, out = clean

    copy = tmp_path / "copy"
    shutil.copytree(s, copy)
    _interrupted(copy, tmp_path / "dst", monkeypatch)
    for p in copy.glob("*.safetensors"):
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))  # same bytes, new mtime
    cli("quantize", copy, tmp_path / "dst", "--max-shard-size", SHARD, "--skip-verify", "--resume")
    got = tree_bytes(tmp_path / "dst")
    want = tree_bytes(out)
    assert {k: v for k, v in got.items() if k != MANIFEST_NAME} == {k: v for k, v in want.items() if k != MANIFEST_NAME}


def test_resume_redoes_a_damaged_finished_output(clean, tmp_path, monkeypatch):
    s, out = clean
    dst = tmp_path / "dst"
    done = _interrupted(s, dst, monkeypatch)
    victim = dst / sorted(done)[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    victim.write_bytes(bytes(data))
    res = cli("quantize", s, dst, "--max-shard-size", SHARD, "--skip-verify", "--resume")
    assert f"{len(done) - 1} already done" in res.output
    assert tree_bytes(dst) == tree_bytes(out)


def test_malformed_manifest_is_named(clean, tmp_path, monkeypatch):
    s, _ = clean
    dst = tmp_path / "dst"
    _interrupted(s, dst, monkeypatch)
    for text in ('{"fingerprint": "x", "done": {', b"\xff\xfe{}", '{"fingerprint": 1, "done": [1]}'):
        (dst / MANIFEST_NAME).write_bytes(text if isinstance(text, bytes) else text.encode())
        before = snapshot(dst)
        one_line_error(cli("quantize", s, dst, "--max-shard-size", SHARD, "--resume", ok=False),
                       str(dst / MANIFEST_NAME), "--overwrite")
        assert snapshot(dst) == before


# ---------------------------------------------------------------- every check before the first write

def _fp8_source(tmp_path, edit) -> Path:
    """A quantized llama checkpoint (one file) with `edit(tensors)` applied to its tensors."""
    from safetensors import safe_open

    s = make_example(tmp_path / "bf16", "llama", "single")
    q = tmp_path / "fp8"
    cli("quantize", s, q, "--skip-verify")
    f = next(q.glob("model-*.safetensors"))
    with safe_open(str(f), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    index = q / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: f.name for k in tensors}}))
    return q


SCALE = "model.layers.0.mlp.down_proj.weight_scale_inv"


@pytest.mark.parametrize("bad, needle", [
    (float("nan"), "not finite and > 0"), (float("inf"), "not finite and > 0"), (0.0, "not finite and > 0"),
    (-1.0, "not finite and > 0"), ("int", "I32; block scales are read as F32, BF16"),
    ("shape", "has shape"), ("e5m2", "F8_E5M2: fp8norm reads F8_E4M3")])
@pytest.mark.parametrize("command", [["convert", "--to", "bf16"], ["convert", "--to", "fp8", "--scale-fmt", "ue8m0"],
                                     ["convert", "--to", "nvfp4"], ["quantize"]])
def test_fp8_sources_are_checked_before_writing(tmp_path, bad, needle, command):
    def edit(t):
        w = SCALE.removesuffix("_scale_inv")
        if bad == "int":
            t[SCALE] = t[SCALE].to(torch.int32)
        elif bad == "shape":
            t[SCALE] = t[SCALE][:1]
        elif bad == "e5m2":
            t[w] = t[w].float().to(torch.float8_e5m2)
        else:
            t[SCALE][0, 0] = bad

    q = _fp8_source(tmp_path, edit)
    before = snapshot(q)
    tensor = SCALE.removesuffix("_scale_inv") if bad == "e5m2" else SCALE
    if bad == "shape" and command == ["quantize"]:
        needle = "needs"  # the plan's own grid check words it so
    one_line_error(cli(command[0], q, tmp_path / "o", *command[1:], ok=False), repr(tensor), needle)
    assert snapshot(q) == before and not (tmp_path / "o").exists()


def test_unsupported_dtypes_are_named_with_what_is_supported(tmp_path):
    from fp8norm.examples import family_tensors

    s = make_example(tmp_path / "src", "llama", "single")
    t = family_tensors("llama")
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].double()
    save_file(t, str(s / "model.safetensors"), metadata={"format": "pt"})
    one_line_error(cli("quantize", s, tmp_path / "o", ok=False), "'model.layers.0.mlp.up_proj.weight' is F64",
                   "BF16, F16, F32", "--exclude")
    assert not (tmp_path / "o").exists()
    cli("quantize", s, tmp_path / "o", "--exclude", "up_proj|gate_proj")  # kept as they are: fine


@pytest.mark.parametrize("command", [["quantize"], ["repack"], ["shard", "--layout", "mcore", "--pp", "2"]])
@pytest.mark.parametrize("text, needle", [(b"{not json", "not a valid config.json"), (b"[1, 2]", "JSON object"),
                                          (b"\xff\xfe", "not UTF-8"),
                                          (b'{"quantization_config": [1]}', "quantization_config is a list")])
def test_malformed_config_json_is_named_before_writing(tmp_path, command, text, needle):
    s = make_example(tmp_path / "src", "llama", "single")
    (s / "config.json").write_bytes(text)
    if command[0] != "shard" and b"quantization_config" in text:
        pytest.skip("quantize replaces quantization_config and repack copies it: only shard reads it")
    one_line_error(cli(command[0], s, tmp_path / "o", *command[1:], ok=False), str(s / "config.json"), needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda i: i["weight_map"].update({"model.norm.weight": 5}), "maps 'model.norm.weight' to 5"),
    (lambda i: i.update({"weight_map": ["a"]}), "weight_map is list"),
    (lambda i: i["weight_map"].update({"model.norm.weight": "../x.safetensors"}), "not a file name"),
])
def test_malformed_index_values_are_named(tmp_path, edit, needle):
    s = make_example(tmp_path / "src", "llama", "sharded", shards=2)
    p = s / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    edit(index)
    p.write_text(json.dumps(index))
    one_line_error(cli("quantize", s, tmp_path / "o", ok=False), str(p), needle)
    p.write_bytes(b"\xff" + p.read_bytes())
    one_line_error(cli("quantize", s, tmp_path / "o", ok=False), str(p), "not UTF-8")
    assert not (tmp_path / "o").exists()


def test_a_shard_missing_from_the_index_is_an_error(tmp_path):
    s = make_example(tmp_path / "src", "llama", "sharded", shards=2)
    save_file({"extra.weight": torch.ones(4)}, str(s / "model-00003-of-00003.safetensors"))
    one_line_error(cli("quantize", s, tmp_path / "o", ok=False), str(s / "model-00003-of-00003.safetensors"),
                   "does not list")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, needle", [
    (["--verify-samples", "-1"], "--verify-samples"), (["--resume", "--overwrite"], "exclude each other"),
    (["--overwrite", "--resume"], "exclude each other"), (["--include", "("], "not a regular expression"),
    (["--exclude", "a[", "--include", "x"], "not a regular expression"), (["--device", "foo"], "'foo'")])
def test_bad_options_are_refused_before_anything_runs(src, tmp_path, args, needle):
    one_line_error(cli("quantize", src, tmp_path / "o", *args, ok=False), needle, exit_code=2)
    assert not (tmp_path / "o").exists()


def test_library_calls_check_their_options_too(src, tmp_path):
    from fp8norm.quantize import quantize

    for kwargs, needle in (({"include": ("(",)}, "--include '('"), ({"device": "foo"}, "--device foo"),
                           ({"resume": True, "overwrite": True}, "exclude each other"),
                           ({"verify_samples": -1}, "verify_samples")):
        with pytest.raises(ValueError) as e:
            quantize(src, tmp_path / "o", progress=False, **kwargs)
        assert needle in str(e.value)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# ---------------------------------------------------------------- OSErrors in every phase

@pytest.fixture
def no_thread_tracebacks(monkeypatch):
    import threading

    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args))
    yield
    assert not seen, seen


def _fail_fsync(monkeypatch, name: str, occurrence: int):
    """os.fsync raises ENOSPC the `occurrence`-th time a file whose name holds `name` is synced."""
    import errno

    real, calls = os.fsync, []

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if name in os.path.basename(path):
            calls.append(path)
            if len(calls) == occurrence:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


@pytest.mark.parametrize("name, occurrence", [
    ("model-00002-of", 1), ("model.safetensors.index.json", 1), ("config.json", 1), ("fp8norm.json", 1),
    (MANIFEST_NAME, 1), (MANIFEST_NAME, 3), (MANIFEST_NAME, "last"), ("tokenizer", 1)])
def test_no_space_in_any_phase_is_one_line_and_resumable(clean, tmp_path, monkeypatch, no_thread_tracebacks,
                                                        name, occurrence):
    import errno

    s, out = clean
    dst = tmp_path / "dst"
    args = ("quantize", s, dst, "--max-shard-size", SHARD, "--skip-verify")
    if name == "tokenizer":  # the copy itself fails (a copied file's fsync fails as any other's)
        def copyfile(a, b):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(fp8norm.output.shutil, "copyfile", copyfile)
        name = ""
    elif occurrence == "last":
        calls = _fail_fsync(monkeypatch, name, 10**6)
        cli(*args[:2], tmp_path / "count", *args[3:])
        occurrence = len(calls)
        _fail_fsync(monkeypatch, name, occurrence)
    else:
        _fail_fsync(monkeypatch, name, occurrence)
    src_before = snapshot(s)
    line = one_line_error(cli(*args, ok=False), "no space left on device", "still needs", "--resume")
    assert name in line and any(f"{dst / p.name}:" in line for p in [*s.iterdir(), *out.iterdir()])
    assert not list(dst.rglob("*.partial")) and snapshot(s) == src_before
    monkeypatch.undo()  # the disk has space again
    cli(*args, "--resume")
    assert tree_bytes(dst) == tree_bytes(out)


@pytest.mark.parametrize("layout, name", [(["--layout", "deepseek", "--mp", "2", "--n-experts", "0"], "model1-mp2"),
                                          (["--layout", "deepseek", "--mp", "2", "--n-experts", "0"],
                                           "fp8norm_parallel_layout.json"),
                                          (["--layout", "mcore", "--pp", "2"], "model.safetensors")])
def test_no_space_while_sharding_is_one_line_and_resumable(clean, tmp_path, monkeypatch, no_thread_tracebacks,
                                                          layout, name):
    s, _ = clean
    cli("shard", s, tmp_path / "ref", *layout)
    _fail_fsync(monkeypatch, name, 1)
    line = one_line_error(cli("shard", s, tmp_path / "o", *layout, ok=False), "no space left on device",
                          "still needs", "--resume")
    assert name in line
    assert not list((tmp_path / "o").rglob("*.partial"))
    monkeypatch.undo()
    cli("shard", s, tmp_path / "o", *layout, "--resume")
    assert tree_bytes(tmp_path / "o") == tree_bytes(tmp_path / "ref")
