"""The architecture, checked: which layer of ``proxy`` may import which, and no import cycles at all.

Every import counts, including those under ``if TYPE_CHECKING:`` and inside functions: a typing-only import is
still coupling, and a cycle hidden behind one is still a cycle.

    resilience   breaker, retry, windows, outlier detection, bulkhead, clock   imports nothing else of the project
    (shared)     logs, sockets, grpc_wire, h2 (one HTTP/2 connection): utilities any layer may use
    policy       the policy language: values, model, loader, rules, schema     resilience only; no I/O modules
    upstream     connections, pools, balancer, checks                          policy, resilience
    live state   runtime, metrics, ratelimits                                  the above
    data plane   http/, grpc/, tcp                                             the above
    process      server, admin, reports, cli, demo, in-process API             anything
"""

from __future__ import annotations

import ast
from pathlib import Path

PROXY = Path(__file__).resolve().parent.parent / "proxy"

# Lower numbers are lower layers; a module may import its own layer and those below.
LAYERS: dict[str, int] = {
    "proxy.resilience": 0,
    "proxy.logs": 0,
    "proxy.sockets": 0,
    "proxy.splice": 0,
    "proxy.h2": 0,
    "proxy.grpc_wire": 0,
    "proxy.policy": 1,
    "proxy.upstream": 2,
    "proxy.metrics": 3,
    "proxy.runtime": 3,
    "proxy.ratelimits": 3,
    "proxy.http": 4,
    "proxy.tcp": 4,
    "proxy.grpc": 4,
}
PROCESS_LAYER = 5
# Standard-library modules that do I/O or run an event loop: the policy language must not need them.
IO_MODULES = ("asyncio", "socket", "ssl", "selectors", "http", "urllib.request", "aiohttp", "uvloop", "httptools")


def module_name(path: Path) -> str:
    parts = path.relative_to(PROXY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return PROCESS_LAYER


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (TYPE_CHECKING blocks, functions)."""
    names: set[str] = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            # ``from proxy.http import wire`` imports the module proxy.http.wire
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def project_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PROXY.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in imports_of(path) if m in modules and m != name}
    return graph


def test_every_module_imports_only_its_own_layer_and_below() -> None:
    wrong = [
        f"{module} (layer {layer_of(module)}) imports {imported} (layer {layer_of(imported)})"
        for module, imported_modules in project_graph().items()
        for imported in sorted(imported_modules)
        if layer_of(imported) > layer_of(module)
    ]
    assert not wrong, "\n".join(wrong)


def test_resilience_imports_nothing_else_of_the_project() -> None:
    wrong = [
        f"{module} imports {imported}"
        for module, imported_modules in project_graph().items()
        if module.startswith("proxy.resilience")
        for imported in imported_modules
        if not imported.startswith("proxy.resilience")
    ]
    assert not wrong, "\n".join(wrong)


def test_the_policy_language_does_no_io() -> None:
    wrong = []
    for path in (PROXY / "policy").rglob("*.py"):
        for imported in imports_of(path):
            if any(imported == io or imported.startswith(io + ".") for io in IO_MODULES):
                wrong.append(f"{module_name(path)} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_not_even_typing_only_ones() -> None:
    graph = project_graph()
    cycles: list[list[str]] = []
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" ↔ ".join(c) for c in cycles)
