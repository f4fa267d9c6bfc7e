"""The import guard: no import cycle, and no import that crosses the layering of the parts
(docs/architecture.md). Reads the sources with ``ast`` (every import, also those inside
functions), so it needs nothing running.

    python tests/test_layering.py [ROOT]    prints the violations of a checkout (exit 1 if any)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Who may import whom, by room: the first name under ipop_switch (or ryu_apps, tests.helpers).
# Every room may import the base rooms. A room not listed here is an error: a new part
# gets its line, and with it its place in the layering.
BASE = {"ipop_switch", "errors", "proc", "netwatch", "aio", "hostport"}
ALLOWED: dict[str, set[str]] = {
    # foundations: know nothing of the parts
    "errors": set(),
    "proc": set(),
    "config": set(),
    "config_writer": {"config"},
    "starter": {"config_writer"},
    "servers": set(),                 # signaling servers' configs and CA (lab and deploy)
    "status_client": set(),           # the agent's status socket, seen from outside
    "render": set(),                  # status documents as tables
    "progress": set(),                # stage lines on long steps (rich only)
    # the parts
    "identity": set(),
    "signaling": {"identity"},
    "tunnel": set(),
    "bridge": set(),
    "ryu_apps": {"bridge.switch_channel"},     # the channel messages and nothing else of ours
    "topology": {"ryu_apps.flood"},           # pure policy and link-state; the simulator runs the flood plan
    "naming": set(),                          # the name table and DNS responder: pure, fed by the agent
    "social": set(),                          # SocialVPN state: pins, address book, friend list; pure
    "web": set(),                             # the overlay view: graph model (pure) and HTTP server, fed by the agent
    # the one place that joins the parts
    "agent": {"config", "identity", "signaling", "tunnel", "bridge", "status_client", "topology", "naming",
              "social", "web"},
    # above the agent: they talk to nodes only through status_client, the CLI or the config
    "lab": {"servers", "identity", "config_writer", "bridge", "status_client", "render", "progress"},
    "deploy": {"servers", "identity", "config_writer"},
    "bench": {"lab", "status_client", "render", "progress"},
    "cli": {"*"},
    # test helpers: anything of the package, no test module
    "tests.helpers": {"*"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def collect(root: Path) -> dict[str, Path]:
    files = [*root.glob("ipop_switch/**/*.py"), *root.glob("ryu_apps/**/*.py"), *root.glob("tests/helpers/*.py")]
    return {module_name(p, root): p for p in files}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that ``name`` imports: ``from pkg import mod`` counts as ``pkg.mod``
    when that is a module, else as ``pkg`` (whose __init__ runs)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:       # import a.b.c of a package a.b: a.b
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def room(mod: str) -> str:
    if mod.startswith("tests.helpers"):
        return "tests.helpers"
    if mod.startswith("ryu_apps"):
        return "ryu_apps"
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def allowed(src: str, dst: str) -> bool:
    rs, rd = room(src), room(dst)
    if rs == rd or rd in BASE:
        return True
    may = ALLOWED.get(rs, set())
    if "*" in may:
        return rd != "tests.helpers" or rs == "tests.helpers"
    sub = dst.split(".", 1)[1] if dst.startswith("ipop_switch.") else dst
    return rd in may or any(sub == m or sub.startswith(m + ".") for m in may)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def violations(root: Path) -> list[str]:
    modules = collect(root)
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    out = []
    for src in sorted(graph):
        if room(src) not in ALLOWED and room(src) not in BASE:
            out.append(f"{src}: room '{room(src)}' has no place in the layering (add it to ALLOWED)")
        for dst in sorted(graph[src]):
            if room(src) != room(dst) and not allowed(src, dst):
                out.append(f"{src} imports {dst}: '{room(src)}' may not import '{room(dst)}'")
    # a package's __init__ and its own modules import each other by design of Python
    # (re-exports); a cycle through two rooms, or within a room through plain modules, is not
    for comp in cycles(graph):
        inner = [m for m in comp if m not in {c.rpartition(".")[0] for c in comp}]
        if len({room(m) for m in comp}) > 1 or len(inner) > 1:
            out.append("import cycle: " + " -> ".join(comp))
    return out


def test_no_cycle_and_no_import_across_the_layering():
    found = violations(ROOT)
    assert not found, "\n".join(found)


def test_the_guard_sees_a_cycle_and_an_upward_import(tmp_path):
    """The guard itself can fail: a checkout with lab -> cli -> lab and agent -> lab."""
    pkg = tmp_path / "ipop_switch"
    for d in ("lab", "agent", "cli"):
        (pkg / d).mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "lab" / "__init__.py").write_text("")
    (pkg / "lab" / "demo.py").write_text("def f():\n    from ..cli import show\n")
    (pkg / "cli" / "__init__.py").write_text("from ..lab import demo\n\ndef show():\n    pass\n")
    (pkg / "agent" / "__init__.py").write_text("")
    (pkg / "agent" / "node.py").write_text("from ipop_switch.lab.demo import f\n")
    found = "\n".join(violations(tmp_path))
    assert "ipop_switch.lab.demo imports ipop_switch.cli" in found
    assert "ipop_switch.agent.node imports ipop_switch.lab.demo" in found
    assert "import cycle: ipop_switch.cli -> ipop_switch.lab.demo" in found


if __name__ == "__main__":
    found = violations(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT)
    print("\n".join(found) or "no cycle, no import across the layering")
    sys.exit(1 if found else 0)
