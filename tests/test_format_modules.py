"""The commands consume the formats through fp8norm.formats alone (issue 21): no module outside
fp8norm/formats/ branches on a format's name, `kernels/` imports nothing of fp8norm, and the fp8norm
modules import each other without a cycle. Read off the source with `ast`, so a new branch fails here
with the file and line that holds it."""

import ast
from pathlib import Path

import pytest

from fp8norm import formats

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fp8norm"
KERNELS = REPO / "kernels"
FORMATS_DIR = PACKAGE / "formats"


def format_words() -> set[str]:
    """Every spelling of a format: its name, its aliases, the library's scheme name."""
    words = set()
    for f in formats.FORMATS.values():
        words |= {f.name, *f.aliases, *((f.library_scheme,) if f.library_scheme else ())}
    return words


def _strings(node: ast.AST) -> list[str]:
    """The string constants a comparison operand is, or holds (`x in ("a", "b")`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def format_branches(path: Path, words: set[str], root: Path = REPO) -> list[str]:
    """`file:line` of each comparison (or startswith / endswith test) against a format's name in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith")):
            operands = node.args
        else:
            continue
        hits = sorted({s for o in operands for s in _strings(o)} & words)
        if hits:
            found.append(f"{path.relative_to(root)}:{node.lineno} compares with {', '.join(hits)}")
    return found


def test_the_format_words_include_the_ones_commands_used_to_branch_on():
    assert {"nvfp4", "nvfp4-ct", "fp8-block", "fp8-ct", "mxfp4", "mxfp8", "fp8-channel", "bf16"} <= format_words()


def test_the_check_finds_a_branch_on_a_format_name(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("def f(to, s):\n    if to == 'nvfp4':\n        return 1\n"
                   "    return s in ('bf16', 'other') or to.startswith('mxfp4')\n")
    assert format_branches(src, format_words(), tmp_path) == [
        "x.py:2 compares with nvfp4", "x.py:4 compares with bf16", "x.py:4 compares with mxfp4"]


def test_no_command_branches_on_a_format_name():
    """A format's behaviour lives in its module under fp8norm/formats/; a command asks the registry."""
    words = format_words()
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if FORMATS_DIR not in path.parents
             for hit in format_branches(path, words)]
    assert found == []


def _imports(path: Path, module: str, *, top_level: bool = False) -> set[str]:
    """The fp8norm modules `module` (at `path`) imports, absolute: at any depth of its code, or with
    `top_level` only those it imports as it is loaded (module level, outside functions)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    out = set()
    for node in _top_level_nodes(tree) if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "fp8norm"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fp8norm":
                continue
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}
    return out


def _top_level_nodes(tree: ast.AST):
    """The nodes run as a module is loaded: everything but the bodies of functions."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo += [c for c in ast.iter_child_nodes(node)
                 if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]


def _module_graph(*, top_level: bool) -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {m: {i for i in _imports(p, m, top_level=top_level) if i in modules and i != m} for m, p in modules.items()}


def test_kernels_import_nothing_of_fp8norm():
    found = [f"{p.relative_to(REPO)} imports {sorted(i)}" for p in sorted(KERNELS.rglob("*.py"))
             if (i := _imports(p, "fp8norm.kernels." + p.stem))
             and not all(m.startswith("fp8norm.kernels") for m in i)]
    assert found == []


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (module -> the modules it imports as it loads), or []. (An import
    inside a function runs after both modules are loaded: the deferred way out of a cycle.)"""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return []


def test_the_cycle_check_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("top_level", [True, False], ids=["as-loaded", "inside-functions-too"])
def test_no_import_cycle_among_fp8norm_modules(top_level):
    """Neither as modules load nor through imports deferred into functions (a deferred import only
    hides a cycle from Python, not from the design). A package imports its submodules (fp8norm.formats
    loads each format module): that edge is the package's own, not a cycle, so a module importing its
    package is dropped."""
    graph = _module_graph(top_level=top_level)
    graph = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}
    assert _cycle(graph) == []


def _outputs(name: str, shape: tuple) -> list[tuple]:
    return [(o.name, o.dtype, o.shape) for o in formats.get(name).outputs("m.layers.0.mlp.experts.gate_up_proj", shape)]


def test_compressed_tensors_formats_split_fused_experts_per_expert_alike():
    """One layout module splits fused 3D experts for every compressed-tensors format (gate rows first)."""
    p = "m.layers.0.mlp.experts"
    assert _outputs("mxfp4", (2, 128, 64)) == [
        (f"{p}.{e}.{proj}.{t}", dt, shape) for e in range(2) for proj in ("gate_proj", "up_proj")
        for t, dt, shape in (("weight_packed", "U8", (64, 32)), ("weight_scale", "U8", (64, 2)))]
    assert _outputs("fp8-channel", (2, 128, 64))[:2] == [(f"{p}.0.gate_proj.weight", "F8_E4M3", (64, 64)),
                                                          (f"{p}.0.gate_proj.weight_scale", "F32", (64, 1))]
    assert _outputs("nvfp4-ct", (2, 128, 64))[:3] == [(f"{p}.0.gate_proj.weight_packed", "U8", (64, 32)),
                                                       (f"{p}.0.gate_proj.weight_scale", "F8_E4M3", (64, 4)),
                                                       (f"{p}.0.gate_proj.weight_global_scale", "F32", (1,))]
    # ModelOpt keeps the fused tensor whole, one scale_2 per expert
    assert _outputs("nvfp4", (2, 128, 64)) == [(f"{p}.gate_up_proj", "U8", (2, 128, 32)),
                                               (f"{p}.gate_up_proj_scale", "F8_E4M3", (2, 128, 4)),
                                               (f"{p}.gate_up_proj_scale_2", "F32", (2,))]


def _config(fmt: str, strategy: str = "group", **weights) -> dict:
    return {"quantization_config": {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"strategy": strategy, **weights}}}}}


class _Info:
    def __init__(self, dtype):
        self.dtype = dtype


def test_detect_reads_each_layout_from_config_and_tensors():
    fp8, bf16 = {"w": _Info("F8_E4M3"), "w_scale_inv": _Info("F32")}, {"w": _Info("BF16")}
    cases = [(_config("mxfp4-pack-quantized"), {}, "mxfp4", (128, 128)),
             (_config("mxfp8-quantized"), {}, "mxfp8", (128, 128)),
             (_config("float-quantized", "channel"), {}, "fp8-channel", (128, 128)),
             (_config("float-quantized", "block", num_bits=8, block_structure=[64, 32]), {}, "fp8-ct", (64, 32)),
             (_config("nvfp4-pack-quantized", "tensor_group"), {}, "nvfp4-ct", (128, 128)),
             ({"quantization_config": {"quant_method": "modelopt"}}, {}, "nvfp4", (128, 128)),
             ({"quantization_config": {"weight_block_size": [64, 64]}}, fp8, "fp8", (64, 64)),
             ({}, bf16, "bf16", (128, 128))]
    assert [(f.name, block) for f, block in (formats.detect(c, t) for c, t, *_ in cases)] == \
        [(name, block) for *_, name, block in cases]
    try:
        formats.detect(_config("int-quantized", "channel", num_bits=8), {})
    except ValueError as e:
        assert str(e) == ("compressed-tensors source with weights {'strategy': 'channel', 'num_bits': 8}: "
                          "only FP8 block is read here")
    else:
        raise AssertionError("an unread compressed-tensors layout was detected")
