"""The project's import graph: no cycle, and the layers only import downwards.

Every `import` statement of lamp_runtime/ and serving/ counts, deferred ones inside functions too
(they still tie the modules together). Layers, top to bottom: serving -> engines (HF decoder / T5,
vLLM; chosen in engine/build.py) -> prompts and backbone -> adapter formats; `errors`, `requests`
and the pure tensor math of `prompts.math` are leaves every layer may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lamp_runtime", "serving")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports: `from a.b import c` counts as a.b.c when that is a module."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a package path
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def edges(graph, source_prefix: str, target_prefix: str) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() if a == source_prefix or a.startswith(source_prefix + ".")
                  for b in targets if b == target_prefix or b.startswith(target_prefix + "."))


def test_the_graph_is_read(graph):
    """Guards the checks below against vacuous success: known edges are found."""
    assert "lamp_runtime.prompts.cache" in graph["lamp_runtime.hf.step_engine"]
    assert "lamp_runtime.hf.kv_batch" in graph["lamp_runtime.hf.generic_decoder"]  # `from . import kv_batch`
    assert "lamp_runtime.vllm.engine" in graph["lamp_runtime.engine.build"]  # deferred import
    assert "serving.store" in graph["serving.config"]


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_runtime_never_imports_serving(graph):
    assert edges(graph, "lamp_runtime", "serving") == []


@pytest.mark.parametrize("engine, other", [
    ("lamp_runtime.vllm", "lamp_runtime.hf.decoder"), ("lamp_runtime.vllm", "lamp_runtime.hf.seq2seq"),
    ("lamp_runtime.vllm", "lamp_runtime.hf.step_engine"), ("lamp_runtime.vllm", "lamp_runtime.engine.runner"),
    ("lamp_runtime.vllm", "lamp_runtime.hf.generic_decoder"), ("lamp_runtime.vllm", "lamp_runtime.hf.llama"),
    ("lamp_runtime.hf.decoder", "lamp_runtime.vllm"), ("lamp_runtime.hf.seq2seq", "lamp_runtime.vllm"),
    ("lamp_runtime.hf.generic_decoder", "lamp_runtime.vllm"),
    ("lamp_runtime.hf.decoder", "lamp_runtime.hf.seq2seq"),
    ("lamp_runtime.hf.seq2seq", "lamp_runtime.hf.decoder"),
    ("lamp_runtime.hf.decoder", "lamp_runtime.hf.generic_decoder"),
    ("lamp_runtime.hf.generic_decoder", "lamp_runtime.hf.decoder"),
])
def test_engines_never_import_each_other(graph, engine, other):
    """Only engine/build.py knows every engine; the others share only the contract (engine/base.py)."""
    assert edges(graph, engine, other) == []


@pytest.mark.parametrize("lower, upper", [
    ("lamp_runtime.adapters", "lamp_runtime.prompts.cache"), ("lamp_runtime.adapters", "lamp_runtime.prompts.prepared"),
    ("lamp_runtime.adapters", "lamp_runtime.backbone"), ("lamp_runtime.adapters", "lamp_runtime.engine"),
    ("lamp_runtime.prompts", "lamp_runtime.adapters"), ("lamp_runtime.prompts", "lamp_runtime.engine"),
    ("lamp_runtime.prompts", "lamp_runtime.backbone"), ("lamp_runtime.backbone", "lamp_runtime.engine"),
    ("lamp_runtime.backbone", "lamp_runtime.prompts"), ("lamp_runtime.requests", "lamp_runtime.engine"),
    ("lamp_runtime.engine", "lamp_runtime.training"), ("lamp_runtime.engine", "lamp_runtime.bench"),
    ("serving.store", "serving.http"), ("serving.store", "serving.replica"),
])
def test_layers_import_only_downwards(graph, lower, upper):
    """Adapter formats know no cache, no backbone and no engine; prompts know no adapter format."""
    assert edges(graph, lower, upper) == []
