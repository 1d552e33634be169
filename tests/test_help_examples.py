"""Every example command line runs: each line under "Example(s):" in every `fp8norm ... --help` page (read
from the live help text), every line of the README's ```bash blocks and every `fp8norm` line of the tools'
help texts.

An `fp8norm` (or `torchrun ... -m fp8norm`) line runs on the built-in tiny checkpoints and must exit 0 and
write its outputs, unless NOT_RUNNABLE lists it with the reason. Its placeholders become paths in a
temporary folder: an output (a value of a click.Path parameter that need not exist, or `> FILE`) a fresh
path; an input the fixture PLACEHOLDERS names, made once per session by the fp8norm command in FIXTURES.
Optional parts written `[--flag X]` are left out. Any other README line must be of a kind OTHER_COMMANDS
names. So a new example that does not run, or a new placeholder, fails here.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fp8norm.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# fixture -> how it is made: an fp8norm command line ({out}: the fixture's path, {name}: another fixture's
# path) or, for a plain file, its text.
FIXTURES = {
    "qwen3.5-moe": "fp8norm make-example {out}",
    "qwen3.5-moe-fp8": "fp8norm quantize {qwen3.5-moe} {out}",
    "qwen3-moe": "fp8norm make-example {out} --family qwen3-moe",
    "qwen3-moe-fp8": "fp8norm quantize {qwen3-moe} {out}",
    "qwen3-moe-mxfp4": "fp8norm quantize {qwen3-moe} {out} --scheme mxfp4",
    "qwen3-moe-mcore": "fp8norm shard {qwen3-moe} {out} --layout mcore --tp 2 --pp 2 --ep 4 --grouped-gemm",
    "deepseek-v3": "fp8norm make-example {out} --family deepseek-v3",
    "deepseek-v3-fp8": "fp8norm quantize {deepseek-v3} {out}",
    "engine-output": "fp8norm make-example {out} --layout engine",
    "prompts.txt": "Hello, world! How are you today?\nWeights are quantized to eight-bit floating point.\n",
    "stats.json": "fp8norm collect-stats {qwen3-moe} --prompts {prompts.txt} --out {out} --max-tokens 32",
}

# input placeholder -> the fixture it stands for. Every Qwen3 name is the one tiny qwen3-moe, so that
# --reference and --activation-stats belong to the SRC they are given with.
PLACEHOLDERS = {
    "/tmp/tiny-bf16": "qwen3.5-moe",  # what `fp8norm make-example /tmp/tiny-bf16` writes
    "/tmp/tiny-fp8": "qwen3.5-moe-fp8",
    "/tmp/tiny-qwen3-moe": "qwen3-moe",
    "/models/Qwen3-8B": "qwen3-moe",
    "/models/Qwen3-8B-FP8": "qwen3-moe-fp8",
    "/models/Qwen3-30B-A3B": "qwen3-moe",
    "/models/Qwen3-30B-A3B-FP8": "qwen3-moe-fp8",
    "/models/DeepSeek-V3": "deepseek-v3-fp8",  # released in FP8
    "/ckpt/qwen3-mxfp4": "qwen3-moe-mxfp4",
    "/ckpt/mcore": "qwen3-moe-mcore",  # what `fp8norm shard --help` writes there
    "/ckpt/engine-output": "engine-output",
    "ENGINE_OUTPUT": "engine-output",
    "SRC": "qwen3-moe",
    "SRC-FP8": "qwen3-moe-fp8",
    "DST": "qwen3-moe-fp8",  # as an input (`verify SRC DST`, `convert DST BACK`): what `quantize SRC DST` wrote
    "stats.json": "stats.json",
    "prompts.txt": "prompts.txt",
}
# (command, placeholder) -> fixture, where the command reads something else under that name
PLACEHOLDERS_BY_COMMAND = {
    ("unshard", "DST"): "qwen3-moe-mcore",  # README: `unshard DST HF-AGAIN` after `shard SRC DST --layout mcore`
}

# example (a regular expression searched in the line as written) -> why it cannot run here
NOT_RUNNABLE = {
    r"fp8norm quantize Qwen/Qwen3-8B ": "a Hub model id: needs the network (tests/test_hub.py covers Hub ids "
                                        "with a local cache)",
    r"DeepSeek-V3-W4A16 .* --mp 8 --n-experts 256": "a GPTQ W4A16 checkpoint with 256 experts: fp8norm makes no "
                                                     "GPTQ example and the tiny ones have 4 experts",
    r"fp8norm shard SRC DST --layout deepseek --mp 8\b": "--mp 8 splits the experts 8 ways; the tiny examples have "
                                                        "4 (tests/test_shard_deepseek.py runs --mp 2)",
    r"torchrun --nnodes 4 ": "4 nodes with a rendezvous endpoint",
}

# the first word of a README line that is not an fp8norm command -> what it is (not run here)
OTHER_COMMANDS = {
    "tools/setup.sh": "installs fp8norm",
    "tools/run_tests.sh": "runs the whole test suite",
    "tools/vllm_check.sh": "builds a vLLM venv (~3.5 GB); opt-in; its --dry-run is tests/test_vllm_check.py",
    "tools/gpu_check.sh": "GPU check; its --dry-run is tests/test_gpu_check.py",
    "python": "a Python tool, pytest or venv (tests/test_aot_compile.py runs tools/aot_compile.py)",
    "python3": "a Python tool, pytest or venv",
    "pip": "installs packages",
    ".": "activates a venv",
    "git": "clones the repository",
    "cd": "enters the clone",
    "cat": "shows a result file",
    "vllm": "serves the output: needs vLLM and a GPU",
}

TORCHRUN_RANKS = 2  # the help's 8 ranks on CPU would oversubscribe a CI runner; 2 exercise the same path


@dataclass
class Example:
    source: str  # where it is written, e.g. "fp8norm quantize --help" or "README.md:120"
    text: str  # the command as written, comment removed


def _strip_comment(line: str) -> str:
    return re.sub(r"(^|\s)#.*$", "", line).strip()


def _example_block(help_text: str) -> list[str]:
    """The lines of the indented block under an "Example:" / "Examples:" heading."""
    lines, out, indent = help_text.splitlines(), [], None
    for line in lines:
        depth = len(line) - len(line.lstrip())
        if indent is None:
            if re.fullmatch(r"\s*Examples?:\s*", line):
                indent = depth
        elif line.strip() and depth > indent:
            out.append(_strip_comment(line))
        else:
            break
    return [x for x in out if x]


def help_examples() -> list[Example]:
    runner, found = CliRunner(), []
    for name in [None, *sorted(main.commands)]:
        argv = [name, "--help"] if name else ["--help"]
        res = runner.invoke(main, argv, terminal_width=200)
        assert res.exit_code == 0, res.output
        found += [Example(f"fp8norm {' '.join(argv)}", line) for line in _example_block(res.output)]
    return found


def readme_examples() -> list[Example]:
    found, text = [], README.read_text()
    for m in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
        first = text.count("\n", 0, m.start(1)) + 1
        joined, start = "", None
        for n, line in enumerate(m.group(1).splitlines(), first):
            start = start or n
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            for command in _strip_comment(joined + line).split("&&"):
                if command.strip():
                    found.append(Example(f"README.md:{start}", command.strip()))
            joined, start = "", None
    return found


def _tool_help(path: Path) -> str:
    """A tool's help text: a Python tool's module docstring (argparse's description), a shell tool's
    leading comment block."""
    if path.suffix == ".py":
        return ast.get_docstring(ast.parse(path.read_text())) or ""
    header = []
    for line in path.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line[1:])
    return "\n".join(header)


def tool_examples() -> list[Example]:
    found = []
    for path in sorted((ROOT / "tools").glob("*.py")) + sorted((ROOT / "tools").glob("*.sh")):
        for line in _tool_help(path).splitlines():
            line = _strip_comment(line)
            words = line.split()
            if len(words) > 1 and words[0] == "fp8norm" and words[1] in main.commands:
                found.append(Example(f"{path.relative_to(ROOT)} --help", line))
    return found


def _words(text: str) -> list[str]:
    """Shell words without the optional `[...]` parts and leading VAR=value assignments."""
    words = shlex.split(re.sub(r"\s*\[[^\]]*\]", "", text))
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        words.pop(0)
    return words


def kind(text: str) -> str:
    """The line's kind: "fp8norm", "torchrun" (of fp8norm), its OTHER_COMMANDS key, or "?"."""
    words = _words(text)
    if words[:1] == ["fp8norm"]:
        return "fp8norm"
    if words[:1] == ["torchrun"] and "-m" in words and words[words.index("-m") + 1:][:1] == ["fp8norm"]:
        return "torchrun"
    return next((k for k in OTHER_COMMANDS if words[:1] == [k]), "?")


def not_runnable(text: str) -> str | None:
    return next((why for pattern, why in NOT_RUNNABLE.items() if re.search(pattern, text)), None)


ALL = help_examples() + readme_examples() + tool_examples()
# each distinct runnable line once, with every place it is written
RUNNABLE: dict[str, list[str]] = {}
for ex in ALL:
    if kind(ex.text) in ("fp8norm", "torchrun") and not not_runnable(ex.text):
        RUNNABLE.setdefault(ex.text, []).append(ex.source)


class Fixtures:
    """The inputs of FIXTURES, each made on first use and kept for the session."""

    def __init__(self, root: Path):
        self.root, self.made = root, {}

    def path(self, name: str) -> Path:
        if name not in self.made:
            out = self.root / name
            recipe = FIXTURES[name]
            if recipe.startswith("fp8norm "):
                command = recipe.replace("{out}", str(out))
                for other in FIXTURES:
                    if "{" + other + "}" in command:
                        command = command.replace("{" + other + "}", str(self.path(other)))
                argv = shlex.split(command)[1:]
                res = CliRunner().invoke(main, [*argv, *_quiet(main.commands[argv[0]])])
                assert res.exit_code == 0, f"fixture {name}: {recipe}: {res.output}"
            else:
                out.write_text(recipe)
            self.made[name] = out
        return self.made[name]


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory):
    return Fixtures(tmp_path_factory.mktemp("example-inputs"))


def _quiet(cmd: click.Command) -> list[str]:
    return ["--quiet"] if any("--quiet" in p.opts for p in cmd.params) else []


def _is_output(param: click.Parameter) -> bool:
    return isinstance(param.type, click.Path) and not param.type.exists


def _looks_like_a_path(value: str) -> bool:
    return "/" in value or bool(re.fullmatch(r"[A-Z][A-Z0-9_-]*|[\w.-]+\.(json|txt|png)", value))


def fp8norm_argv(words: list[str], fixtures: Fixtures, tmp: Path) -> tuple[list[str], list[Path], Path | None]:
    """The command line `fp8norm ...` (words after "fp8norm") on tiny checkpoints: (argv, outputs, stdout file)."""
    stdout_file = None
    if ">" in words:
        at = words.index(">")
        words, stdout_file = words[:at], tmp / Path(words[at + 1]).name
    name = words[0]
    assert name in main.commands, f"fp8norm {name}: no such command"
    cmd = main.commands[name]
    values, _, _ = cmd.make_parser(click.Context(cmd, info_name=name)).parse_args(list(words[1:]))
    mapped, outputs = {}, []
    for param in cmd.params:
        given = values.get(param.name)
        for value in given if isinstance(given, list) else [given]:
            if not isinstance(value, str):
                continue
            if _is_output(param):
                mapped[value] = tmp / "out" / value.strip("/").replace("/", "_")
                outputs.append(mapped[value])
            elif (name, value) in PLACEHOLDERS_BY_COMMAND or value in PLACEHOLDERS:
                mapped[value] = fixtures.path(PLACEHOLDERS_BY_COMMAND.get((name, value)) or PLACEHOLDERS[value])
            else:
                assert not _looks_like_a_path(value), \
                    f"fp8norm {name}: input {value!r} is not in PLACEHOLDERS (say which fixture it stands for)"
    argv = []
    for w in words:
        opt, eq, value = w.partition("=")
        argv.append(f"{opt}={mapped.get(value, value)}" if eq and opt.startswith("--") else str(mapped.get(w, w)))
    return argv + [q for q in _quiet(cmd) if q not in argv], outputs, stdout_file


@pytest.mark.parametrize("text", list(RUNNABLE), ids=list(RUNNABLE))
def test_example_runs(text, fixtures, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a mapping missed lands here, not in the checkout
    (tmp_path / "out").mkdir()
    words = _words(text)
    where = f"{text!r} ({', '.join(RUNNABLE[text])})"
    if kind(text) == "torchrun":
        at = words.index("-m")
        launcher = words[1:at]
        if "--nproc-per-node" in launcher:
            launcher[launcher.index("--nproc-per-node") + 1] = str(TORCHRUN_RANKS)
        argv, outputs, stdout_file = fp8norm_argv(words[at + 2:], fixtures, tmp_path)
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", *launcher, "-m",
                              "fp8norm", *argv], capture_output=True, text=True, timeout=300)
        code, output, stdout = res.returncode, res.stdout + res.stderr, res.stdout
    else:
        argv, outputs, stdout_file = fp8norm_argv(words[1:], fixtures, tmp_path)
        res = CliRunner().invoke(main, argv)
        code, output, stdout = res.exit_code, res.output, res.stdout
    assert code == 0, f"{where} -> fp8norm {' '.join(argv)}: exit {code}\n{output[-3000:]}"
    if stdout_file:
        stdout_file.write_text(stdout)
        outputs.append(stdout_file)
    for out in outputs:
        written = any(out.iterdir()) if out.is_dir() else out.is_file() and out.stat().st_size > 0
        assert written, f"{where}: wrote nothing to {out}"
        if out.suffix == ".json":
            json.loads(out.read_text())  # plan --json, verify --json, collect-stats --out


def test_every_example_runs_or_is_listed():
    """Every line found is run (test_example_runs), listed in NOT_RUNNABLE or of a kind OTHER_COMMANDS
    names; every listing is still used; every help page shows examples and they were all found."""
    unknown = [f"{ex.source}: {ex.text}" for ex in ALL if kind(ex.text) == "?"]
    assert not unknown, f"not an fp8norm command and not in OTHER_COMMANDS: {unknown}"
    for pattern in NOT_RUNNABLE:
        assert any(re.search(pattern, ex.text) for ex in ALL), f"NOT_RUNNABLE {pattern!r} matches no example"
    for kind_ in OTHER_COMMANDS:
        assert any(kind(ex.text) == kind_ for ex in ALL), f"OTHER_COMMANDS {kind_!r} matches no example"
    for ex in ALL:
        assert ex.text in RUNNABLE or not_runnable(ex.text) or kind(ex.text) in OTHER_COMMANDS, ex
    pages = {ex.source for ex in ALL if ex.source.startswith("fp8norm ")}
    assert pages == {"fp8norm --help", *(f"fp8norm {n} --help" for n in main.commands)}
    assert any(ex.source.startswith("README.md") and kind(ex.text) == "torchrun" for ex in ALL)


def test_example_blocks_are_read_as_written():
    """The parsers against hand-written text: heading, indentation, comments, continuation lines,
    `&&`, optional parts, and where the block ends."""
    text = ("Usage: x\n\n  Intro.\n\n  Examples:\n    fp8norm a SRC   # a comment\n    fp8norm b 'x\\.y'\n\n"
            "Options:\n  --q\n")
    assert _example_block(text) == ["fp8norm a SRC", "fp8norm b 'x\\.y'"]
    assert _words("fp8norm b 'x\\.y' [--revision R]") == ["fp8norm", "b", "x\\.y"]
    assert _words("OUT=/tmp/x tools/gpu_check.sh") == ["tools/gpu_check.sh"]
    assert kind("torchrun --nproc-per-node 8 -m fp8norm quantize SRC DST") == "torchrun"
    assert kind("torchrun --nproc-per-node 8 -m other") == "?"
    assert kind("vllm serve X") == "vllm" and kind("make all") == "?"
    multi = [ex for ex in readme_examples() if ex.text.startswith("torchrun --nnodes 4")]
    assert len(multi) == 1 and multi[0].text.endswith("-m fp8norm quantize SRC DST")  # joined across "\"
    first = [ex.text for ex in readme_examples() if ex.source == readme_examples()[0].source]
    assert first[0] == "tools/setup.sh" and first[1] == ". .venv/bin/activate"  # split at &&
    assert first[2].startswith("fp8norm make-example")
    # the tools' help texts are read (none shows an fp8norm command line today)
    assert "python tools/make_tiny_checkpoint.py /tmp/tiny" in _tool_help(ROOT / "tools/make_tiny_checkpoint.py")
    assert "  tools/setup.sh --dev " in _tool_help(ROOT / "tools/setup.sh")
