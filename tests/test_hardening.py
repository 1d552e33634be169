"""Hardening: crash-safe resume under kill -9, bad inputs, full disks, a fuzzed header reader.

Every failure is one line naming the file (and tensor), exit code 1, no traceback; nothing
half-written sits under a final name; the source is never modified.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import fp8norm.output
import fp8norm.st_io
from fp8norm.cli import main
from fp8norm.examples import family_tensors, make_example
from fp8norm.st_io import SafetensorsError, read_header
from tests.ckpt_utils import cli, one_line_error, tree_bytes
from tests.readers import reader

SHARD = "2MB"


# ---------------------------------------------------------------- kill -9 at many points, then resume

@pytest.fixture(scope="module")
def crash_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    src = make_example(root / "src", "qwen3.5-moe", "sharded")
    clean = root / "clean"
    cli("quantize", src, clean, "--max-shard-size", SHARD, "--skip-verify")
    return src, clean


def _run(src, dst, env_extra, *args):
    env = dict(os.environ, **env_extra)
    cmd = [sys.executable, "-m", "fp8norm", "quantize", str(src), str(dst), "--max-shard-size", SHARD,
           "--skip-verify", "-q", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def _count_points(src, tmp_path):
    counter = tmp_path / "points"
    res = _run(src, tmp_path / "count", {"FP8NORM_COUNT_POINTS": str(counter)})
    assert res.returncode == 0, res.stderr
    return int(counter.read_text())


def _kill_then_resume(src, clean, dst, kill_at):
    res = _run(src, dst, {"FP8NORM_KILL_AT": str(kill_at)})
    assert res.returncode == -signal.SIGKILL, (kill_at, res.returncode, res.stderr[-500:])
    # whatever stands under a final shard name is complete and right
    for shard in dst.glob("model-*.safetensors"):
        assert shard.read_bytes() == (clean / shard.name).read_bytes(), (kill_at, shard.name)
    assert not (dst / "model.safetensors.index.json").exists() or (dst / "config.json").exists() or kill_at
    res = _run(src, dst, {}, "--resume")
    assert res.returncode == 0, (kill_at, res.stderr[-2000:])
    assert tree_bytes(dst) == tree_bytes(clean), kill_at


def _spread(n_points, k):
    return sorted({max(1, round(i * n_points / (k + 1))) for i in range(1, k + 1)} | {1, n_points})


def test_kill9_at_a_few_points_then_resume(crash_src, tmp_path):
    src, clean = crash_src
    n = _count_points(src, tmp_path)
    assert n > 50  # before/after every tensor, shard rename and text file
    for i, kill_at in enumerate(_spread(n, 3)):
        _kill_then_resume(src, clean, tmp_path / f"o{i}", kill_at)


@pytest.mark.slow
def test_kill9_at_many_points_then_resume(crash_src, tmp_path):
    src, clean = crash_src
    n = _count_points(src, tmp_path)
    points = _spread(n, 24)
    assert len(points) >= 20
    for i, kill_at in enumerate(points):
        _kill_then_resume(src, clean, tmp_path / f"o{i}", kill_at)
    print(f"\nkill -9 points survived: {len(points)} of {n} fault points")


# every other writing command: killed at a few points (many with -m slow), resumed, byte-identical

OTHER_WRITERS = {
    "convert": ["convert", "{fp8}", "{dst}", "--to", "fp8", "--scale-fmt", "ue8m0", "--max-shard-size", "300KB"],
    "repack": ["repack", "{src}", "{dst}", "--max-shard-size", "1MB"],
    "shard": ["shard", "{src}", "{dst}", "--layout", "deepseek", "--mp", "2", "--n-experts", "4"],
    "unshard": ["unshard", "{mcore}", "{dst}", "--max-shard-size", "1MB"],
}


@pytest.fixture(scope="module")
def writer_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("writers")
    src = make_example(root / "src", "qwen3-moe", "sharded")
    cli("quantize", src, root / "fp8", "--max-shard-size", "1MB", "--skip-verify")
    cli("shard", src, root / "mcore", "--layout", "mcore", "--pp", "2", "--ep", "2")
    return {"src": src, "fp8": root / "fp8", "mcore": root / "mcore"}


def _writer(command, inputs, dst, env=None, extra=()):
    args = [a.format(dst=dst, **inputs) for a in OTHER_WRITERS[command]]
    return subprocess.run([sys.executable, "-m", "fp8norm", *args, "-q", *extra], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))


def _sweep(command, inputs, tmp_path, k):
    clean, counter = tmp_path / "clean", tmp_path / "points"  # counting the points changes no byte
    assert _writer(command, inputs, clean, {"FP8NORM_COUNT_POINTS": str(counter)}).returncode == 0
    points = _spread(int(counter.read_text()), k)
    for i, kill_at in enumerate(points):
        dst = tmp_path / f"o{i}"
        res = _writer(command, inputs, dst, {"FP8NORM_KILL_AT": str(kill_at)})
        assert res.returncode == -signal.SIGKILL, (command, kill_at, res.stderr[-1000:])
        for p in dst.rglob("*.safetensors"):  # whatever stands under a final name is complete and right
            assert p.read_bytes() == (clean / p.relative_to(dst)).read_bytes(), (command, kill_at, p)
        res = _writer(command, inputs, dst, extra=("--resume",))
        assert res.returncode == 0, (command, kill_at, res.stderr[-2000:])
        assert tree_bytes(dst) == tree_bytes(clean), (command, kill_at)
    return points


# convert's targets are each killed and resumed by the conformance matrix (tests/test_conformance.py)
@pytest.mark.parametrize("command", [c for c in OTHER_WRITERS if c != "convert"])
def test_every_writer_killed_then_resumed(writer_inputs, tmp_path, command):
    _sweep(command, writer_inputs, tmp_path, 1)


@pytest.mark.slow
@pytest.mark.parametrize("command", list(OTHER_WRITERS))
def test_every_writer_killed_at_many_points(writer_inputs, tmp_path, command):
    points = _sweep(command, writer_inputs, tmp_path, 12)
    print(f"\n{command}: kill -9 points survived: {len(points)}")


# ---------------------------------------------------------------- malformed safetensors files

def _file(tmp_path, header: dict | bytes, data: bytes = b"", length_delta=0) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    p = d / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw) + length_delta) + raw + data)
    return p


def _raw_file(tmp_path, content: bytes) -> Path:
    (tmp_path / "src").mkdir()
    p = tmp_path / "src" / "model.safetensors"
    p.write_bytes(content)
    return p


def _t(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_FILES = {
    "truncated": (lambda tp: _file(tp, {"a": _t(offsets=(0, 8))}, b"\0" * 5), "truncated file"),
    "header-longer-than-file": (lambda tp: _file(tp, {"a": _t()}, b"\0" * 8, length_delta=10_000),
                                "exceeds the file"),
    "header-not-json": (lambda tp: _file(tp, b"{not json at all", b""), "not valid JSON"),
    "header-not-object": (lambda tp: _file(tp, b"[1, 2, 3]", b""), "not a JSON object"),
    "overlapping": (lambda tp: _file(tp, {"a": _t(offsets=(0, 8)), "b": _t(offsets=(4, 12))}, b"\0" * 12),
                    "overlaps the previous tensor"),
    "out-of-bounds": (lambda tp: _file(tp, {"a": _t(offsets=(0, 8)), "b": _t(offsets=(8, 16))}, b"\0" * 8),
                      "truncated file"),
    "gap": (lambda tp: _file(tp, {"a": _t(offsets=(0, 8)), "b": _t(offsets=(16, 24))}, b"\0" * 24),
            "leaves a gap"),
    "not-covering": (lambda tp: _file(tp, {"a": _t(offsets=(0, 8))}, b"\0" * 16), "cover 8 bytes of a 16-byte"),
    "unknown-dtype": (lambda tp: _file(tp, {"a": _t(dtype="F7")}, b"\0" * 8), "unknown dtype 'F7'"),
    "shape-bytes-mismatch": (lambda tp: _file(tp, {"a": _t(shape=(3,))}, b"\0" * 8), "needs 12 bytes"),
    "negative-shape": (lambda tp: _file(tp, {"a": _t(shape=(-2,))}, b"\0" * 8), "not a list of non-negative"),
    "deep-nesting": (lambda tp: _file(tp, b"[" * 100_000 + b"]" * 100_000, b""), "nested too deeply"),
    "too-short": (lambda tp: _raw_file(tp, b"abc"), "too short"),
    # json.loads keeps the last of two equal keys: the first tensor's bytes looked like a gap
    "duplicate-key": (lambda tp: _file(tp, b'{"a": %s, "a": %s}' % (json.dumps(_t(offsets=(0, 8))).encode(),
                                                                    json.dumps(_t(offsets=(8, 16))).encode()),
                                       b"\0" * 16), "header names 'a' twice"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_shard_is_one_clear_line(tmp_path, case):
    make, expected = BAD_FILES[case]
    path = make(tmp_path)
    line = one_line_error(cli("quantize", path.parent, tmp_path / "o", ok=False), str(path), expected)
    assert "model.safetensors" in line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def _sharded(tmp_path, index_edit=None, second=None):
    src = make_example(tmp_path / "src", "llama", "sharded", shards=2)
    if second is not None:
        save_file(second, str(src / "model-00002-of-00002.safetensors"))
    if index_edit:
        p = src / "model.safetensors.index.json"
        index = json.loads(p.read_text())
        index_edit(index)
        p.write_text(json.dumps(index))
    return src


def test_index_and_directory_problems(tmp_path):
    src = _sharded(tmp_path / "a", lambda i: i["weight_map"].update({"model.extra.weight": "model-00009-of-00009.safetensors"}))
    one_line_error(cli("plan", src, ok=False), "names shard 'model-00009-of-00009.safetensors', which does not exist")
    src = _sharded(tmp_path / "b", lambda i: i["weight_map"].update({"model.ghost.weight": "model-00001-of-00002.safetensors"}))
    one_line_error(cli("plan", src, ok=False), "'model.ghost.weight' is indexed in model-00001-of-00002.safetensors but not stored")
    tensors = family_tensors("llama")
    dup = {"model.norm.weight": tensors["model.norm.weight"], "model.embed_tokens.weight": tensors["model.embed_tokens.weight"]}
    src = make_example(tmp_path / "c" / "src", "llama", "engine", shards=2)
    save_file(dup, str(src / "zz-extra.safetensors"))
    one_line_error(cli("plan", src, ok=False), "is in both")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("plan", tmp_path / "empty", ok=False), "no *.safetensors files")
    (tmp_path / "nosf").mkdir()
    (tmp_path / "nosf" / "config.json").write_text("{}")
    one_line_error(cli("quantize", tmp_path / "nosf", tmp_path / "o", ok=False), "no *.safetensors files")


def test_nonfinite_weight_and_allow_nonfinite(tmp_path):
    src = make_example(tmp_path / "src", "llama", "single")
    tensors = family_tensors("llama")
    tensors["model.layers.0.mlp.gate_proj.weight"][3, 3] = float("inf")
    save_file(tensors, str(src / "model.safetensors"))
    one_line_error(cli("quantize", src, tmp_path / "o", ok=False), "model.safetensors",
                   "'model.layers.0.mlp.gate_proj.weight'", "non-finite")
    res = cli("quantize", src, tmp_path / "o2", "--allow-nonfinite", "--overwrite")
    assert "'model.layers.0.mlp.gate_proj.weight' holds NaN/Inf: kept unquantized" in res.output
    with safe_open(str(tmp_path / "o2" / "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.gate_proj.weight").dtype == torch.bfloat16
        assert "model.layers.0.mlp.gate_proj.weight_scale_inv" not in f.keys()
        # gate/up of one MLP are fused by engines: up_proj stays unquantized with it
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float8_e4m3fn
    assert "'model.layers.0.mlp.up_proj.weight' too (fused with a non-finite tensor)" in res.output
    skipped = json.loads((tmp_path / "o2" / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"} <= set(skipped)


def test_a_stray_scale_and_a_3d_dense_weight_get_a_note(tmp_path):
    """Planned as asked but likely not as meant: each says so in one line of the summary."""
    src = make_example(tmp_path / "src", "llama", "single")
    tensors = family_tensors("llama")
    down = tensors["model.layers.1.mlp.down_proj.weight"]
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.stack([down, down])  # 3D, but not an expert stack
    tensors["model.layers.0.mlp.gone_proj.weight_scale_inv"] = torch.ones(2, 2)  # its weight is not there
    tensors["model.layers.0.self_attn.k_scale"] = torch.ones(())  # a KV-cache scale: no weight expected
    save_file(tensors, str(src / "model.safetensors"))
    res = cli("quantize", src, tmp_path / "o", "--skip-verify")
    notes = [line for line in res.output.splitlines() if line.startswith("note ")]
    shape = list(tensors["model.layers.1.mlp.down_proj.weight"].shape)
    assert notes == [
        "note      model.safetensors: 'model.layers.0.mlp.gone_proj.weight_scale_inv' is named as a scale, but its "
        "weight 'model.layers.0.mlp.gone_proj.weight' is not in the checkpoint: copied as it is",
        f"note      model.safetensors: 'model.layers.1.mlp.down_proj.weight' is 3D {shape} but not an expert stack: "
        "quantized as 2 stacked matrices with 3D scales (--exclude it to keep it)"], res.output
    with safe_open(str(tmp_path / "o" / "model-00001-of-00001.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.0.mlp.gone_proj.weight_scale_inv"), torch.ones(2, 2))
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight_scale_inv").dim() == 3


def test_fp8_weight_without_scale_or_with_a_wrong_one(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    q = torch.zeros(256, 256, dtype=torch.float8_e4m3fn)
    save_file({"model.layers.0.mlp.down_proj.weight": q}, str(src / "model.safetensors"))
    one_line_error(cli("plan", src, ok=False), "'model.layers.0.mlp.down_proj.weight' is FP8 but has no")
    save_file({"model.layers.0.mlp.down_proj.weight": q, "model.layers.0.mlp.down_proj.weight_scale_inv": torch.ones(3, 2)},
              str(src / "model.safetensors"))
    one_line_error(cli("plan", src, ok=False), "has shape [3, 2]", "needs [2, 2]")


def test_dst_that_cannot_be_written(tmp_path):
    src = make_example(tmp_path / "src", "llama", "single")
    one_line_error(cli("quantize", src, "/proc/fp8norm-cannot-exist/out", ok=False), "/proc/fp8norm-cannot-exist")
    (tmp_path / "file").write_text("x")
    res = cli("quantize", src, tmp_path / "file", ok=False)
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_disk_full_is_reported_and_resumable(tmp_path, monkeypatch):
    src = make_example(tmp_path / "src", "qwen3.5-moe", "sharded")
    cli("quantize", src, tmp_path / "clean", "--max-shard-size", SHARD, "--skip-verify")
    real, writes = fp8norm.st_io.ShardWriter.write, []

    def fills_up(self, name, t):
        writes.append(name)
        if len(writes) == 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, t)

    monkeypatch.setattr(fp8norm.st_io.ShardWriter, "write", fills_up)
    line = one_line_error(cli("quantize", src, tmp_path / "o", "--max-shard-size", SHARD, "--skip-verify", ok=False),
                          "o/model-0000", "no space left on device", "the output still needs", "--resume")
    assert "are free" in line
    assert not list((tmp_path / "o").rglob("*.partial"))
    monkeypatch.setattr(fp8norm.st_io.ShardWriter, "write", real)
    cli("quantize", src, tmp_path / "o", "--max-shard-size", SHARD, "--skip-verify", "--resume")
    assert tree_bytes(tmp_path / "o") == tree_bytes(tmp_path / "clean")


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(bytes): a tmpfs of that size mounted (or remounted, keeping its files) at tmp_path/fs."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        opts = f"remount,size={size}" if mounted else f"size={size}"
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"mounting a tmpfs refused here ({res.stderr.strip()}): needs root")
        mounted.append(size)
        return mnt

    yield mount
    if mounted:
        subprocess.run(["umount", str(mnt)], check=True)


_NO_SPACE = re.compile(r"Error: (\S+): no space left on device: the output still needs ([\d,]+) bytes \(([\d,]+) "
                       r"bytes of finished files are kept\), ([\d,]+) are free; free space and run again with --resume$")


@pytest.mark.parametrize("pages_short", [4, 8, 12])
def test_a_real_full_disk_names_the_output_file_with_true_numbers(tmp_path, tmpfs, pages_short):
    """A tmpfs a few pages too small for the output (the free-space check counts bytes, the file system
    pages): the line names the output file being written (not a source file), the bytes its missing
    files hold and the free bytes; after growing the tmpfs, --resume ends byte-identical."""
    src = make_example(tmp_path / "src", "llama", "sharded", shards=2)
    args = ["--max-shard-size", "300KB", "--skip-verify"]
    cli("quantize", src, tmp_path / "clean", *args)
    clean = {k: len(v) for k, v in tree_bytes(tmp_path / "clean").items()}
    pages = sum(-(-n // 4096) for n in clean.values()) + 4  # + the folder and the lock
    mnt = tmpfs((pages - pages_short) * 4096)
    dst = mnt / "o"
    src_before = _hashes(src)
    res = cli("quantize", src, dst, *args, ok=False)
    line = one_line_error(res, "no space left on device")
    where, needs, kept, free = _NO_SPACE.match(line).groups()
    assert Path(where).parent == dst and Path(where).name in clean, line
    manifest = "fp8norm-manifest.json"  # rewritten at the end: its bytes are needed again
    present = {p.name for p in dst.iterdir() if p.name in clean and p.name != manifest}
    assert int(needs.replace(",", "")) == (sum(n for k, n in clean.items() if k not in present and k != manifest)
                                           + (dst / manifest).stat().st_size), line
    assert int(kept.replace(",", "")) == sum(clean[k] for k in present if k.startswith("model-")), line
    assert int(free.replace(",", "")) == shutil.disk_usage(mnt).free - 4096, line  # the lock's page, freed at the end
    assert not list(dst.rglob("*.partial")) and _hashes(src) == src_before
    tmpfs(pages * 4096 * 2)
    cli("quantize", src, dst, *args, "--resume")
    assert tree_bytes(dst) == tree_bytes(tmp_path / "clean")


def test_not_enough_space_is_refused_before_writing(tmp_path, monkeypatch):
    src = make_example(tmp_path / "src", "llama", "single")
    monkeypatch.setattr(fp8norm.output.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    one_line_error(cli("quantize", src, tmp_path / "o", ok=False), "the output needs", "only 1,000 are free")
    assert not list((tmp_path / "o").glob("*.safetensors"))


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["--debug", "plan", str(tmp_path / "empty")])
    assert res.exit_code == 1 and res.exception is not None and "no *.safetensors" in str(res.exception)


def _hashes(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()} | {"__mtimes__": [p.stat().st_mtime_ns for p in sorted(path.rglob("*"))]}


def test_sources_are_read_only_for_every_command(tmp_path):
    src = make_example(tmp_path / "src", "deepseek-v3", "sharded")
    before = _hashes(src)
    cli("plan", src)
    cli("quantize", src, tmp_path / "q", "--skip-verify")
    cli("repack", src, tmp_path / "r")
    cli("shard", src, tmp_path / "s", "--layout", "deepseek", "--mp", "2", "--n-experts", "4")
    q_before = _hashes(tmp_path / "q")
    cli("convert", tmp_path / "q", tmp_path / "c", "--to", "bf16")
    cli("verify", src, tmp_path / "q")
    assert _hashes(src) == before and _hashes(tmp_path / "q") == q_before


# ---------------------------------------------------------------- fuzzing the header reader

hypothesis = reader("hypothesis")
st = hypothesis.strategies

_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=8))
_entry = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(list(fp8norm.st_io.DTYPES) + ["F4", "X", ""]), _json_scalar),
    "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), _json_scalar),
    "data_offsets": st.one_of(st.lists(st.integers(-10, 2**62), min_size=0, max_size=3), _json_scalar)})
_header = st.dictionaries(st.text(max_size=6), st.one_of(_entry, _json_scalar), max_size=4)
FUZZ = {"cases": 0}


@hypothesis.settings(max_examples=400, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(header=_header, data=st.binary(max_size=64), delta=st.integers(-16, 2**40), raw=st.booleans(),
                  junk=st.binary(max_size=80))
def test_fuzz_header_reader_only_raises_its_own_error(tmp_path_factory, header, data, delta, raw, junk):
    FUZZ["cases"] += 1
    d = tmp_path_factory.mktemp("fz", numbered=True)
    p = d / "x.safetensors"
    if raw:  # arbitrary bytes, including forged lengths
        p.write_bytes(junk)
    else:
        body = json.dumps(header).encode()
        p.write_bytes(struct.pack("<Q", max(0, len(body) + delta) if delta < 2**39 else delta) + body + data)
    try:
        infos, _ = read_header(p)
    except SafetensorsError as e:
        assert str(p) in str(e)
        return
    for info in infos.values():  # anything accepted is readable within the file
        assert info.begin >= 8 and info.end <= p.stat().st_size
        fp8norm.st_io.read_tensor(info)


def test_fuzz_case_count():
    assert FUZZ["cases"] == 0 or FUZZ["cases"] >= 400


@pytest.mark.parametrize("layout_args", [["--layout", "deepseek", "--mp", "2", "--n-experts", "4"],
                                         ["--layout", "mcore", "--pp", "2", "--ep", "2"]], ids=["deepseek", "mcore"])
def test_shard_killed_then_resumed(tmp_path, layout_args):
    src = make_example(tmp_path / "src", "qwen3-moe", "sharded")
    cli("shard", src, tmp_path / "clean", *layout_args)
    base = [sys.executable, "-m", "fp8norm", "shard", str(src), str(tmp_path / "o"), *layout_args, "-q"]
    for kill_at in (3, 40):
        res = subprocess.run(base + (["--resume"] if kill_at != 3 else []), capture_output=True, text=True,
                             env=dict(os.environ, FP8NORM_KILL_AT=str(kill_at)))
        assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
        assert not [p for p in (tmp_path / "o").rglob("model*.safetensors")
                    if p.read_bytes() != (tmp_path / "clean" / p.relative_to(tmp_path / "o")).read_bytes()]
    res = subprocess.run(base + ["--resume"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert tree_bytes(tmp_path / "o") == tree_bytes(tmp_path / "clean")
    res = subprocess.run(base, capture_output=True, text=True)  # without --resume: refused, not clobbered
    assert res.returncode == 1 and "--resume" in res.stderr
