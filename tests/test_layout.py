"""The package's layout holds: imports flow one way through the layers ARCHITECTURE.md
describes, with no cycle; the server never imports the tools for tests or the library for
upstreams; aiohttp's internals are touched only where they are fenced and listed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"

# Lower layers never import higher ones (ARCHITECTURE.md's module map, in order).
LAYERS: dict[str, int] = {
    # leaves: facts and primitives every layer may use
    "errors": 0, "headers": 0, "state": 0, "keys": 0, "metrics": 0, "crypto": 0,
    "tls": 0,
    # the configuration: what it is, then how a file becomes one
    "config": 1, "loader": 2,
    # stores and clients
    "store": 3, "sessions": 3, "session_tokens": 3, "cache": 4, "platform": 3, "wechat": 3, "pool": 3,
    "wecom": 3,
    "access_tokens": 4, "ratelimit": 4, "assertion": 4, "forwarded": 3, "logs": 4,
    "login_hook": 4,
    "qq": 3, "douyin": 3, "alipay": 3,
    # authentication, and the wiring of everything a request needs
    "auth": 5, "services": 6,
    # endpoints and the proxy pipeline
    "websocket": 7, "userdata": 7, "expectation": 7, "endpoints": 8, "proxy": 8,
    # the application, the server, the command line
    "app": 9, "admin": 10, "reload": 10, "server": 10, "supervisor": 11, "__main__": 12,
    "__init__": 0,
}
# aiohttp internals may be used only in these files, each listing them at its top.
FENCED = {"pool.py", "server.py"}
PRIVATE_AIOHTTP = re.compile(
    r"aiohttp\.(web_protocol|client_proto|web_urldispatcher)|\._match_info|_make_server")


def _imports(path: Path) -> set[str]:
    """The gateway modules ``path`` imports at run time (not under ``TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module == "gateway" or node.module.startswith("gateway.")):
            found.add(node.module.split(".")[1] if "." in node.module else node.names[0].name)
    return found


def _server_modules() -> dict[str, set[str]]:
    return {p.stem: _imports(p) for p in sorted(PACKAGE.glob("*.py"))}


def test_every_server_module_has_a_layer() -> None:
    unplaced = sorted(set(_server_modules()) - set(LAYERS))
    assert not unplaced, f"place these modules in LAYERS and in ARCHITECTURE.md: {unplaced}"
    gone = sorted(set(LAYERS) - set(_server_modules()))
    assert not gone, f"LAYERS names modules that no longer exist: {gone}"


def test_imports_flow_down_the_layers() -> None:
    wrong = [f"{module} (layer {LAYERS[module]}) imports {target} (layer {LAYERS[target]})"
             for module, targets in _server_modules().items() for target in targets
             if target in LAYERS and LAYERS[target] > LAYERS[module]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle() -> None:
    graph = {m: {t for t in ts if t in LAYERS} for m, ts in _server_modules().items()}
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in trail, "import cycle: " + " -> ".join((*trail, module))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, (*trail, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_the_server_imports_neither_the_test_tools_nor_the_upstream_library() -> None:
    wrong = {m: sorted(t & {"testing", "upstream"}) for m, t in _server_modules().items()
             if t & {"testing", "upstream"}}
    assert not wrong, wrong


def test_the_upstream_library_stands_alone() -> None:
    for path in sorted((PACKAGE / "upstream").glob("*.py")):
        outside = {t for t in _imports(path) if t not in ("verifier", "middleware")}
        assert not outside, f"{path.name} imports gateway modules {outside}: backends " \
                            "install this package to verify assertions, not to run the gateway"


def test_aiohttp_internals_only_where_fenced() -> None:
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
             for p in sorted(PACKAGE.rglob("*.py")) if p.name not in FENCED
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if PRIVATE_AIOHTTP.search(line)]
    assert not found, "\n".join(found)
    for name in FENCED:
        head = (PACKAGE / name).read_text(encoding="utf-8").split('"""')[1]
        assert "aiohttp internals" in head, f"{name} must list the aiohttp internals it uses " \
                                            "in its module docstring"


def test_architecture_names_every_module() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [p.relative_to(PACKAGE).as_posix() for p in sorted(PACKAGE.rglob("*.py"))
               if p.name != "__init__.py" and p.relative_to(PACKAGE).as_posix() not in text]
    assert not missing, f"ARCHITECTURE.md's module map lacks {missing}"
