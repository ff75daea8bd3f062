"""The project's import graph: no cycle, and the layers only import downwards.

Every `import` statement of lamp_runtime/ and serving/ counts, deferred ones inside functions too
(they still tie the modules together). Layers, top to bottom: serving -> the engine builder
(lamp_runtime/engines/) -> engines (lamp_runtime/hf/, vllm/; each over the contract and shared
parts of lamp_runtime/engine/) -> prompts and backbone -> adapter formats; `errors`, `requests`
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
    assert "lamp_runtime.vllm.engine" in graph["lamp_runtime.engines"]  # deferred import
    assert "lamp_runtime.engine.base" in graph["lamp_runtime.engines"]  # under TYPE_CHECKING
    assert "serving.store" in graph["serving.config"]


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def package_of(module: str) -> str:
    """lamp_runtime.hf.decoder -> lamp_runtime.hf; lamp_runtime.engines -> lamp_runtime.engines."""
    return ".".join(module.split(".")[:2])


def test_no_package_cycle_in_the_runtime(graph):
    """Packages, not only modules: e.g. engine -> vllm -> engine was a cycle of modules that did not
    import each other. (serving.http's routes and serving.admin still import each other's package.)"""
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module.startswith("lamp_runtime."):
            packages.setdefault(package_of(module), set()).update(
                package_of(t) for t in targets if package_of(t) != package_of(module))
    assert find_cycle(packages) is None, f"package cycle: {' -> '.join(find_cycle(packages))}"


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_runtime_never_imports_serving(graph):
    assert edges(graph, "lamp_runtime", "serving") == []


ENGINE_PACKAGES = ("lamp_runtime.hf", "lamp_runtime.vllm", "lamp_runtime.llamacpp")
BUILDER = "lamp_runtime.engines"


@pytest.mark.parametrize("target", [*ENGINE_PACKAGES, BUILDER])
def test_the_contract_imports_no_engine(graph, target):
    """lamp_runtime.engine is the contract and what engines share: it knows none of them."""
    assert edges(graph, "lamp_runtime.engine", target) == []


@pytest.mark.parametrize("engine", ENGINE_PACKAGES)
def test_engines_never_import_each_other_or_the_builder(graph, engine):
    for other in (*ENGINE_PACKAGES, BUILDER):
        if other != engine:
            assert edges(graph, engine, other) == []


# Besides the builder, who may name an engine package: the HF-only tools that step a transformers
# core synchronously (training, the in-process benches), the vLLM-only benches, and the serving
# settings, which build a VllmOptions (a plain dataclass) for `--engine vllm`.
ENGINE_IMPORTERS = (BUILDER, "lamp_runtime.training", "lamp_runtime.bench", "serving.config")


@pytest.mark.parametrize("engine", ENGINE_PACKAGES)
def test_only_the_builder_builds_engines(graph, engine):
    importers = {a.split(" -> ")[0] for prefix in PACKAGES for a in edges(graph, prefix, engine)}
    strangers = sorted(a for a in importers if package_of(a) != engine
                       and not any(a == p or a.startswith(p + ".") for p in ENGINE_IMPORTERS))
    assert strangers == []


def test_serving_reads_engines_through_the_contract(graph):
    """The replica and its metrics use lamp_runtime.engines, the contract and the streams adapter."""
    for engine in ENGINE_PACKAGES:
        assert [e for e in edges(graph, "serving", engine) if not e.startswith("serving.config ")] == []


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
