"""Find the tensors of a Hugging Face checkpoint directory, reading only headers.

Accepted layouts: `model.safetensors`; `model-NNNNN-of-NNNNN.safetensors` with
`model.safetensors.index.json`; or arbitrarily named `*.safetensors` without an index (engine output).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .st_io import SafetensorsError, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
# an fp8norm output's folders of an --overwrite in progress (see fp8norm.output): never part of a checkpoint
OUTPUT_WORK_FOLDERS = (".fp8norm-overwrite", ".fp8norm-replaced-moving", ".fp8norm-replaced")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used as it is; the message says which file and why."""


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def pack_greedy(nbytes: list[int], max_bytes: int) -> list[int]:
    """Shard number of each unit, in order: a new shard when the next unit would overflow this one."""
    out, size, shard = [], 0, 0
    for n in nbytes:
        if size and size + n > max_bytes:
            shard, size = shard + 1, 0
        out.append(shard)
        size += n
    return out


def read_json(path: Path, what: str = "JSON file", expect: type = dict, error: type = None):
    """A JSON document of type `expect`; any problem is one line naming the file (`error`: the class)."""
    error = error or CheckpointError
    try:
        doc = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text, so not a valid {what}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not a valid {what} ({e})") from None
    except RecursionError:
        raise error(f"{path}: {what} nested too deeply") from None
    if not isinstance(doc, expect):
        raise error(f"{path}: a {what} holds a JSON {'object' if expect is dict else expect.__name__}, "
                    f"this one a {type(doc).__name__}")
    return doc


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


@dataclass
class SourceCheckpoint:
    root: Path
    files: list[Path]  # safetensors files, in order
    tensors: dict[str, TensorInfo]  # every tensor, in file order then offset order
    standard_names: bool  # files are model.safetensors or model-NNNNN-of-NNNNN.safetensors
    other_files: list[Path]  # everything else to copy, relative to root (index excluded)


def open_checkpoint(root: str | Path) -> SourceCheckpoint:
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    index_path = root / INDEX_NAME
    if index_path.exists():
        files, weight_map = _files_from_index(index_path)
    else:
        weight_map = None
        files = sorted(root.glob("*.safetensors"), key=_natural_key)
        if (root / SINGLE_NAME).exists():
            files = [root / SINGLE_NAME] + [f for f in files if f.name != SINGLE_NAME]
        if not files:
            raise CheckpointError(f"{root}: no *.safetensors files (and no {INDEX_NAME})")
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        infos, _ = read_header(f)
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(f"{root}: tensor {name!r} is in both {tensors[name].file.name} and {f.name}")
            tensors[name] = info
    if weight_map is not None:
        _check_index_matches(index_path, weight_map, tensors)
    standard = (len(files) == 1 and files[0].name == SINGLE_NAME and weight_map is None) or (
        weight_map is not None and all(SHARD_RE.match(f.name) for f in files))
    skip = {index_path.resolve(), *(f.resolve() for f in files)}
    unlisted = sorted(p.name for p in root.glob("*.safetensors") if p.resolve() not in skip)
    if unlisted:  # its tensors would silently go missing from the output
        raise CheckpointError(f"{root / unlisted[0]}: a safetensors file that {INDEX_NAME} does not list "
                              f"({len(unlisted)} such file(s)); add its tensors to the index or move it away")
    other = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.resolve() not in skip
                   and p.relative_to(root).parts[0] not in OUTPUT_WORK_FOLDERS)
    return SourceCheckpoint(root, files, tensors, standard, other)


def _files_from_index(index_path: Path) -> tuple[list[Path], dict[str, str]]:
    weight_map = _weight_map(index_path)
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        p = index_path.parent / shard
        if not p.is_file():
            raise CheckpointError(f"{index_path}: names shard {shard!r}, which does not exist")
        files.append(p)
    return files, weight_map


def _weight_map(index_path: Path) -> dict[str, str]:
    weight_map = read_json(index_path, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: weight_map is {type(weight_map).__name__}, not an object")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or "/" in v or v in ("", ".", "..")),
               None)
    if bad is not None:
        raise CheckpointError(f"{index_path}: weight_map maps {bad!r} to {weight_map[bad]!r}, not a file name "
                              "in this directory")
    return weight_map


def _check_index_matches(index_path: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]):
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != shard:
            raise CheckpointError(f"{index_path}: tensor {name!r} is indexed in {shard} but not stored there")
    extra = [n for n in tensors if n not in weight_map]
    if extra:
        raise CheckpointError(f"{index_path}: {len(extra)} tensors stored in shards are missing from the "
                              f"index, e.g. {extra[0]!r} in {tensors[extra[0]].file.name}")


def load_reference_names(ref: str | Path) -> tuple[set[str], dict, Path]:
    """Tensor names of a reference checkpoint (a directory or its index json), its config.json
    quantization_config (or {}), and the folder it lives in."""
    ref = Path(ref)
    folder = ref if ref.is_dir() else ref.parent
    if ref.is_dir():
        if (ref / INDEX_NAME).exists():
            names = set(_weight_map(ref / INDEX_NAME))
        else:
            files = sorted(ref.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{ref}: reference has no {INDEX_NAME} and no *.safetensors")
            names = set()
            for f in files:
                names.update(read_header(f)[0])
    elif ref.suffix == ".json":
        names = set(_weight_map(ref))
    else:
        raise CheckpointError(f"{ref}: expected an FP8 checkpoint directory or its {INDEX_NAME}")
    qcfg = {}
    cfg = folder / "config.json"
    if cfg.exists():
        qcfg = read_json(cfg, "config.json").get("quantization_config") or {}
        if not isinstance(qcfg, dict):
            raise CheckpointError(f"{cfg}: quantization_config is {type(qcfg).__name__}, not an object")
    return names, qcfg, folder


__all__ = ["open_checkpoint", "SourceCheckpoint", "CheckpointError", "SafetensorsError", "shard_name",
           "load_reference_names", "read_json", "pack_greedy", "INDEX_NAME", "SINGLE_NAME"]
