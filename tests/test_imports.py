"""The package's import graph has no circles (docs: architecture). A circle works until someone
imports the modules in another order, then fails with a half-initialised module; this reads
the source instead of importing, so it catches one however the modules are imported."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_smcsd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """The hf_smcsd modules `path` imports (at module level only, or anywhere in the file)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from . import x` imports a module x; `from .m import f` imports m.
            found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
    return {name for name in found if name.split(".")[0] == "hf_smcsd"}


def _graph(top_level_only: bool, under: str = "hf_smcsd") -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        if name == under or name.startswith(under + "."):
            # Importing a.b.c runs a/__init__ and a/b/__init__ too, but a package's __init__
            # importing its own modules is not a circle through them: keep module edges only.
            graph[name] = {m for m in _imports(path, name, top_level_only) if m in modules and m != name}
    return graph


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting, done = [], set()

    def visit(node):
        if node in visiting:
            return visiting[visiting.index(node):] + [node]
        if node in done or node not in graph:
            return None
        visiting.append(node)
        for other in sorted(graph[node]):
            if found := visit(other):
                return found
        visiting.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if found := visit(node):
            return found
    return None


def test_the_bench_modules_import_no_circle_even_inside_functions():
    """bench and fidelity once imported each other (one at module level, one inside main)."""
    graph = {name: {m for m in deps if m.startswith("hf_smcsd.bench.")}
             for name, deps in _graph(top_level_only=False, under="hf_smcsd.bench").items()}
    assert _circle(graph) is None, " -> ".join(_circle(graph))


def test_the_package_has_no_module_level_import_circle():
    graph = {name: {m for m in deps if not PACKAGE.joinpath(*m.split(".")[1:], "__init__.py").exists()}
             for name, deps in _graph(top_level_only=True).items()}
    assert _circle(graph) is None, " -> ".join(_circle(graph))


def test_the_checker_sees_a_circle():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("relative, module, expected", [
    ("bench/fidelity.py", "hf_smcsd.bench.fidelity", {"hf_smcsd.bench.common", "hf_smcsd.testing.enumeration"}),
])
def test_relative_imports_resolve(relative, module, expected):
    assert expected <= _imports(PACKAGE / relative, module, top_level_only=True)


def test_the_runtime_does_not_import_the_test_scaffolding():
    """generate() and everything it loads run without `hf_smcsd.testing` (tiny models,
    enumeration): checked in a fresh interpreter, where nothing else has imported it."""
    code = ("import sys, hf_smcsd, hf_smcsd.runners.paged, hf_smcsd.runners.static, hf_smcsd.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('hf_smcsd.testing')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout
