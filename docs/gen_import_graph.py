"""Draw the import graph of ``metric/`` and check that it only points downward.

Every ``import`` and ``from ... import`` in ``metric/``, ``selfsup/`` and ``xbn_queue/`` counts, module
level or inside a function (a lazy import is still a dependency, and a lazy cycle is still a cycle). Each
module sits in one part, and the parts are ordered top to bottom::

    metric CLI  >  experiments, retrieval  >  the metric trainer  >  xbn_queue.training  >  xbn_queue

A module may import modules of its own part or of a lower one, never of a higher one nor of a sibling
part (experiments and retrieval do not import each other); ``metric`` and ``selfsup`` never import each
other; and no set of modules imports itself round a cycle.

Usage::

    python docs/gen_import_graph.py          # rewrite the graph in docs/design.md
    python docs/gen_import_graph.py --check  # exit 1 if the page is stale or a rule is broken
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("metric", "selfsup", "xbn_queue")
PAGE = ROOT / "docs" / "design.md"
BEGIN, END = "<!-- import-graph:begin -->", "<!-- import-graph:end -->"

# (part, rank): a module may import only parts of a lower rank, or its own part.
PARTS = {
    "metric CLI": 4, "metric.experiments": 3, "metric.retrieval": 3, "metric trainer": 2,
    "selfsup CLI": 4, "selfsup trainer": 2, "xbn_queue.training": 1, "xbn_queue": 0,
}


def modules() -> Dict[str, Path]:
    """Every module of the three packages, by dotted name (a package by its own name)."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def part_of(name: str) -> str:
    """The part a module belongs to (see ``PARTS``)."""
    head = name.split(".")
    if head[0] == "xbn_queue":
        return "xbn_queue.training" if name.startswith("xbn_queue.training") else "xbn_queue"
    if name in ("metric.cli", "metric.__main__"):
        return "metric CLI"
    if name in ("selfsup.cli", "selfsup.__main__", "selfsup.compare"):
        return "selfsup CLI"
    if head[0] == "metric" and len(head) > 1 and head[1] in ("experiments", "retrieval"):
        return f"metric.{head[1]}"
    return f"{head[0]} trainer"


def _resolve(name: str, path: Path, node: ast.AST, known: Dict[str, Path]) -> List[str]:
    """The project modules one import statement of module ``name`` refers to."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        # ``from pkg import sub`` names a submodule when one exists, else an attribute of ``pkg``.
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = []
    for target in targets:
        while target and target not in known:  # ``import a.b.c`` of an attribute: its module
            target = target.rpartition(".")[0]
        if target and target != name:
            out.append(target)
    return out


def edges() -> Set[Tuple[str, str]]:
    """(importer, imported) for every import between two project modules."""
    known = modules()
    found = set()
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update((name, target) for target in _resolve(name, path, node, known))
    return found


def _ancestors(name: str) -> Set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def violations(graph: Set[Tuple[str, str]]) -> List[str]:
    """Every broken rule, one line each (empty when the graph points only downward, without cycles)."""
    bad = []
    for src, dst in sorted(graph):
        if dst in _ancestors(src):  # a module importing its own package's __init__: not a layer edge
            continue
        a, b = part_of(src), part_of(dst)
        if a.split()[0].split(".")[0] != b.split()[0].split(".")[0] and PARTS[b] >= 2:
            bad.append(f"{src} imports {dst}: the trainers never import each other")
        elif a != b and PARTS[b] >= PARTS[a]:
            bad.append(f"{src} ({a}) imports {dst} ({b}): imports go only downward")
    bad += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return bad


def cycles(graph: Set[Tuple[str, str]]) -> List[List[str]]:
    """One cycle per strongly connected set of modules (Tarjan's algorithm)."""
    succ: Dict[str, List[str]] = {}
    for src, dst in graph:
        if dst not in _ancestors(src):
            succ.setdefault(src, []).append(dst)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(succ.get(v, ())):
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
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return out


def mermaid(graph: Set[Tuple[str, str]]) -> str:
    """The graph of ``metric/`` as a Mermaid flowchart: its modules grouped by part, the rest collapsed."""
    def node(name: str) -> str:
        if name.startswith("metric"):
            return name
        return part_of(name).replace(" trainer", "")

    shown = {(node(s), node(d)) for s, d in graph if s.startswith("metric") and node(s) != node(d)}
    shown = {(s, d) for s, d in shown if d not in _ancestors(s)}
    names = sorted({n for e in shown for n in e})
    ident = {n: n.replace(".", "_").replace(" ", "_") for n in names}
    lines = ["```mermaid", "flowchart TB"]
    for part in ("metric CLI", "metric.experiments", "metric.retrieval", "metric trainer"):
        members = [n for n in names if n.startswith("metric") and part_of(n) == part]
        lines.append(f'  subgraph part_{part.replace(" ", "_").replace(".", "_")}["{part}"]')
        lines += [f'    {ident[n]}["{n}"]' for n in members]
        lines.append("  end")
    lines += [f'  {ident[n]}["{n}"]' for n in names if not n.startswith("metric")]
    lines += [f"  {ident[s]} --> {ident[d]}" for s, d in sorted(shown)]
    lines.append("```")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Rewrite (or ``--check``) the graph between the markers of docs/design.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale or a rule is broken")
    args = parser.parse_args(argv)
    graph = edges()
    bad = violations(graph)
    for line in bad:
        print(line)
    text = PAGE.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    new = f"{head}{BEGIN}\n{mermaid(graph)}\n{END}{tail}"
    if args.check:
        if new != text:
            print(f"{PAGE.relative_to(ROOT)}: the import graph is stale; run python docs/gen_import_graph.py")
            return 1
        return 1 if bad else 0
    PAGE.write_text(new)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
