"""The package's shape: no import cycles between its modules, and the layers it promises.

Imports are read from the source (module level and inside functions alike: a deferred import
is still a dependency; only ``if TYPE_CHECKING:`` imports are left out), so a new cycle fails
here before it surprises anyone at run time.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import matformer

ROOT = Path(matformer.__file__).parent


def _module(path: Path) -> str:
    parts = ["matformer", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (a package stands for its ``__init__``)."""
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and ast.unparse(block.test).endswith("TYPE_CHECKING")
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.ImportFrom, ast.Import)) or id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = (package[: len(package) - node.level + 1] if node.level else [])
                stem = ".".join([*base, *(node.module.split(".") if node.module else [])])
                subs = [f"{stem}.{a.name}" for a in node.names]
                # `from . import x` names submodules; `from .m import x` depends on m itself
                targets = subs if node.module is None else [stem, *subs]
            graph[mod] |= {t for t in targets if t in files and t != mod}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n):], n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in graph[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_no_import_cycles() -> None:
    graph = _graph()
    assert len(graph) > 20  # the walk found the package
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_cycle_detector_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_layers() -> None:
    """The checkpoint format knows no model family; metrics know no files; the core never
    reaches up into the command line, and only the command line reaches the vision commands."""
    graph = _graph()
    families = {"matformer.model", "matformer.vision", "matformer.vision.model",
                "matformer.families"}
    assert not _reaches(graph, "matformer.checkpoint") & families
    assert "matformer.checkpoint" not in _reaches(graph, "matformer.metrics")
    for core in ("model", "cache", "generate", "speculative", "recipe", "train", "data",
                 "checkpoint", "metrics", "config", "distributed", "tokenizer", "families"):
        reached = _reaches(graph, f"matformer.{core}")
        assert not {m for m in reached if m.startswith("matformer.cli")}, core
    # the block's arithmetic is functions of tensors: it reaches no other module of ours
    assert _reaches(graph, "matformer.block") == set()


def test_submodels_need_no_trainer() -> None:
    """Extraction, export, import and sweeps never reach the training loop: elastification,
    a training workflow, lives beside the trainer (matformer.elastify)."""
    graph = _graph()
    trainer = {"matformer.train", "matformer.recipe", "matformer.task", "matformer.distributed",
               "matformer.elastify"}
    for mod in graph:
        if mod.startswith("matformer.submodels"):
            assert not _reaches(graph, mod) & trainer, mod


FLAG = re.compile(r"(?:^|[\s(`'\"/])--[a-z][a-z0-9-]*")


def _raised_text(node: ast.Raise) -> str:
    """Every string constant inside a raise statement (f-string parts included)."""
    return " ".join(n.value for n in ast.walk(node)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str))


def _flags_in_raises(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{hit}" for hit in _flags_in_raises_at(path)]


def test_only_the_command_line_speaks_of_flags() -> None:
    """Errors raised outside ``cli/`` name the library's parameters, never command-line flags:
    the command line says the same advice with its flags (``cli.main.FLAG_WORDS``)."""
    core = [p for p in ROOT.rglob("*.py") if "cli" not in p.relative_to(ROOT).parts]
    found = [hit for p in sorted(core) for hit in _flags_in_raises(p)]
    assert found == []


def test_the_flag_check_sees_a_flag(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text('def f(x):\n    raise ValueError(f"{x} exists; pass --force")\n')
    assert [h.split(": ")[-1] for h in _flags_in_raises_at(bad)] == ["--force"]


def _flags_in_raises_at(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{n.lineno}: {m.group().strip()}" for n in ast.walk(tree)
            if isinstance(n, ast.Raise) for m in FLAG.finditer(_raised_text(n))]


def test_the_command_line_says_the_library_advice_in_flags() -> None:
    from matformer.cli.main import describe_error
    from matformer.outputs import OutputExistsError

    e = OutputExistsError("output x already exists (a file); choose a new path, or pass "
                          "overwrite=True to replace it")
    assert describe_error(e).endswith("or pass --force to replace it")
    # a command without --force keeps the library's words (elastify, slice-hf)
    from matformer.cli.main import build_parser, command_flags

    parser = build_parser()
    assert "--force" in command_flags(parser, "extract")
    assert "--resume" in command_flags(parser, "vision")  # vision train's, one level down
    elastify = command_flags(parser, "elastify")
    assert "--force" not in elastify
    assert describe_error(e, elastify).endswith("or pass overwrite=True to replace it")


RAW_WRITE = re.compile(r"\.write_text\(|\.write_bytes\(|\.open\([\"'][wa]|\bopen\([^)]*[\"'][wa]b?[\"']"
                       r"|\.savefig\(|\.mkdir\(")


def test_every_write_goes_through_outputs() -> None:
    """Files, folders and plots are written by :mod:`matformer.outputs` (atomic files and
    folders, the metrics log, folders, figures); no other module writes one directly."""
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
             for p in sorted(ROOT.rglob("*.py")) if p.name != "outputs.py"
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if RAW_WRITE.search(line) and not line.lstrip().startswith("#")]
    assert found == []


def test_append_line_names_what_it_cannot_write(tmp_path: Path) -> None:
    import pytest

    from matformer.outputs import OutputError, append_line

    log = tmp_path / "metrics.jsonl"
    append_line(log, '{"step": 1}')
    append_line(log, '{"step": 2}\n')
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    with pytest.raises(OutputError, match=r"cannot append to .*missing"):
        append_line(tmp_path / "missing" / "metrics.jsonl", "{}")
