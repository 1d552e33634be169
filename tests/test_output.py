"""fp8norm.output: text and copied files written atomically, and the manifests of one run folded in one
place (the main one and those of the ranks of a torchrun job)."""

import errno
import hashlib
import json
import os
from types import SimpleNamespace

import pytest

import fp8norm.output as output
from fp8norm import digest
from fp8norm.output import (MANIFEST_NAME, ManifestRecord, OutputError, atomic_write_text, copy_file, fingerprint,
                            read_manifests, save_folded_manifest)

FP = "f" * 64
SOURCES = {"model.safetensors": {"size": 10, "mtime_ns": 1}}


def test_fingerprint_is_the_sha256_of_the_canonical_json():
    want = hashlib.sha256(b'{"a": [1, 2], "b": {"c": null}}').hexdigest()
    assert fingerprint({"b": {"c": None}, "a": [1, 2]}) == want


def test_atomic_write_text_writes_exactly_the_text_and_syncs_it(tmp_path, fsyncs):
    path = tmp_path / "config.json"
    path.write_text("old")
    atomic_write_text(path, 'é "x"\n')
    assert path.read_bytes() == 'é "x"\n'.encode()
    assert fsyncs == [str(tmp_path / ".config.json.partial"), str(tmp_path)]


def test_copy_file_copies_the_bytes_into_new_folders_and_syncs_them(tmp_path, fsyncs):
    src = tmp_path / "tokenizer.json"
    src.write_bytes(bytes(range(256)) * 10)
    out = tmp_path / "dst" / "sub" / "tokenizer.json"
    copy_file(src, out)
    assert out.read_bytes() == src.read_bytes()
    assert fsyncs == [str(out.parent / ".tokenizer.json.partial"), str(out.parent)]


def test_copy_file_out_of_space_names_the_output_and_keeps_no_partial(tmp_path, monkeypatch):
    src = tmp_path / "tokenizer.json"
    src.write_text("{}")
    out = tmp_path / "dst" / "tokenizer.json"

    def copyfile(a, b):
        open(b, "wb").close()
        raise OSError(errno.ENOSPC, "No space left on device", str(a))  # shutil names the file read from

    monkeypatch.setattr(output.shutil, "copyfile", copyfile)
    with pytest.raises(OSError) as e:
        copy_file(src, out)
    assert e.value.filename == str(out)
    assert os.listdir(out.parent) == []


def _manifest(path, done, fp=FP, **extra):
    path.write_text(json.dumps({"fingerprint": fp, "complete": False, "sources": SOURCES, "done": done,
                                "digest": digest.ALGORITHM, **extra}))


def test_the_ranks_manifests_are_read_with_the_main_one(tmp_path):
    _manifest(tmp_path / MANIFEST_NAME, {"a": {"size": 1}})
    _manifest(tmp_path / ".fp8norm-manifest.rank1.json", {"b": {"size": 2}})
    _manifest(tmp_path / ".fp8norm-manifest.rank7.json", {"c": {"size": 3}})
    main, done = read_manifests(tmp_path, FP)
    assert main["sources"] == SOURCES
    assert done == {"a": {"size": 1}, "b": {"size": 2}, "c": {"size": 3}}


def test_a_rank_manifest_of_another_plan_is_refused(tmp_path):
    _manifest(tmp_path / MANIFEST_NAME, {})
    _manifest(tmp_path / ".fp8norm-manifest.rank1.json", {}, fp="0" * 64)
    with pytest.raises(OutputError) as e:
        read_manifests(tmp_path, FP)
    assert str(e.value) == (f"{tmp_path}: was started with other settings or another source (plan fingerprints "
                            "differ); use --overwrite to start again")


def test_a_rank_manifest_of_sha256_digests_is_refused(tmp_path):
    _manifest(tmp_path / MANIFEST_NAME, {})
    rank = tmp_path / ".fp8norm-manifest.rank2.json"
    _manifest(rank, {}, digest="sha256")
    with pytest.raises(OutputError, match=f"^{rank}: records sha256 digests"):
        read_manifests(tmp_path, FP)


def test_save_folded_manifest_writes_the_main_one_and_removes_the_ranks(tmp_path):
    _manifest(tmp_path / ".fp8norm-manifest.rank1.json", {"b": {"size": 2}})
    save_folded_manifest(tmp_path, FP, SOURCES, {"a": {"size": 1}, "b": {"size": 2}}, complete=True)
    assert os.listdir(tmp_path) == [MANIFEST_NAME]
    m = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert m == {"fingerprint": FP, "complete": True, "sources": SOURCES, "digest": digest.ALGORITHM,
                 "done": {"a": {"size": 1}, "b": {"size": 2}}}


def test_a_rank_records_its_files_in_its_own_manifest(tmp_path):
    record = ManifestRecord(tmp_path, FP, SOURCES, SimpleNamespace(rank=3))
    record.finished("model-00001.safetensors", {"size": 5, "digest": "d"})
    assert os.listdir(tmp_path) == [".fp8norm-manifest.rank3.json"]
    assert json.loads((tmp_path / ".fp8norm-manifest.rank3.json").read_text())["done"] == {
        "model-00001.safetensors": {"size": 5, "digest": "d"}}
    ManifestRecord(tmp_path, FP, SOURCES, SimpleNamespace(rank=0)).save()  # rank 0 writes the main one
    assert sorted(os.listdir(tmp_path)) == [".fp8norm-manifest.rank3.json", MANIFEST_NAME]

