"""The package's import graph, imports inside functions included: no cycle, and vLLM stays out of every
module's import (it is loaded when an engine starts, so planning and the light paths never pay for it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src/assistant_axis"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for successor in sorted(graph[node]):
            if state.get(successor) == 1:
                return [*path[path.index(successor) :], successor]
            if successor not in state and (found := visit(successor, [*path, successor])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_package_has_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "assistant_axis.interop" in graph["assistant_axis.chat"]  # the scan sees what is imported
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # and the search finds a cycle where one is
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_importing_any_module_leaves_vllm_out():
    names = sorted(_modules())
    script = f"import importlib, sys\nfor name in {names!r}:\n    importlib.import_module(name)\n"
    script += "print('vllm' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "False", "a module imports vllm when it is imported"


def _names_compared(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every comparison with one of `names` as a string literal (`x == "vllm"`,
    `x in ("local", "vllm")`, `x != "openai"`)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            found += [
                (node.lineno, item.value)
                for item in items
                if isinstance(item, ast.Constant) and isinstance(item.value, str) and item.value in names
            ]
    return found


def test_only_the_engines_and_the_registries_know_the_runtimes_by_name():
    """Outside `engines/` no module (nor workflow script) compares a backend or engine name: what a runtime
    does is asked of its engine or its registry entry (`ENGINES`, `judge.JUDGES`)."""
    from assistant_axis.engines import ENGINES
    from assistant_axis.judge import JUDGES, RENAMED_JUDGES

    names = {*ENGINES, *JUDGES, *RENAMED_JUDGES}
    assert _names_compared(ast.parse('if backend == "vllm" or judge in ("local", "x"): pass'), names) == [
        (1, "vllm"),
        (1, "local"),
    ]  # the scan finds a comparison where there is one
    outside = [p for p in PACKAGE.rglob("*.py") if "engines" not in p.relative_to(PACKAGE).parts]
    outside += sorted((PACKAGE.parents[1] / "workflow/scripts").glob("*.py"))
    assert len(outside) > 30
    found = [
        f"{path.relative_to(PACKAGE.parents[1])}:{line}: {name!r}"
        for path in outside
        for line, name in _names_compared(ast.parse(path.read_text()), names)
    ]
    assert not found, "\n".join(found)
