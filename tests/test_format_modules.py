"""The commands consume the formats through fp8norm.formats alone (issue 21): no module outside
fp8norm/formats/ branches on a format's name, `kernels/` imports nothing of fp8norm, and the fp8norm
modules import each other without a cycle. Read off the source with `ast`, so a new branch fails here
with the file and line that holds it."""

import ast
from pathlib import Path

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


def _module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {m: {i for i in _imports(p, m, top_level=True) if i in modules and i != m} for m, p in modules.items()}


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


def test_no_import_cycle_among_fp8norm_modules():
    """A package imports its submodules (fp8norm.formats loads each format module): that edge is the
    package's own, not a cycle, so a module importing its package is dropped."""
    graph = _module_graph()
    graph = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}
    assert _cycle(graph) == []
