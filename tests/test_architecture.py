"""The shape of the code: short functions, and imports that only point downward.

Issue 24 asks that no function in the three packages be longer than 60 lines (docstring and decorators
included), and that ``metric/`` read as three parts (trainer, experiment series, retrieval) importing
only downward toward ``xbn_queue/``, without cycles. Both are checked here on the source itself.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 60


def _graph_tool():
    spec = importlib.util.spec_from_file_location("gen_import_graph", ROOT / "docs" / "gen_import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def long_functions(source: str, limit: int = LIMIT):
    """(name, lines) of every function or method in ``source`` longer than ``limit`` lines."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - first + 1
            if length > limit:
                out.append((node.name, length))
    return out


def test_the_length_rule_counts_docstrings_and_decorators():
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT - 3))
    fits = f'@staticmethod\ndef f():\n    """Doc."""\n{body}\n'
    assert long_functions(fits) == []
    assert long_functions(f"@property\n{fits}") == [("f", LIMIT + 1)]


@pytest.mark.parametrize("package", ["metric", "selfsup", "xbn_queue"])
def test_no_function_is_longer_than_60_lines(package):
    found = [f"{path.relative_to(ROOT)}::{name} ({n} lines)"
             for path in sorted((ROOT / package).rglob("*.py"))
             for name, n in long_functions(path.read_text())]
    assert not found, "split along a real seam:\n" + "\n".join(found)


def test_imports_point_only_downward_without_cycles():
    tool = _graph_tool()
    assert tool.violations(tool.edges()) == []


def test_the_rules_catch_an_upward_import_a_sibling_import_and_a_cycle():
    tool = _graph_tool()
    bad = tool.violations({
        ("metric.train", "metric.retrieval.search"),        # trainer -> an application above it
        ("metric.experiments.sweep", "metric.retrieval"),    # one application -> its sibling
        ("xbn_queue.queue", "xbn_queue.training.loop"),     # library -> trainer infrastructure
        ("selfsup.train", "metric.data"),                   # one trainer -> the other
        ("metric.data", "metric.fastdata"), ("metric.fastdata", "metric.data"),  # a cycle
        ("metric.retrieval.search", "metric.retrieval"),    # its own package: allowed
        ("metric.cli", "metric.experiments.compare"),       # downward: allowed
    })
    assert len(bad) == 5, bad
    assert sum("only downward" in b for b in bad) == 3
    assert any("never import each other" in b for b in bad)
    assert any(b.startswith("import cycle: metric.data -> metric.fastdata") for b in bad)


def test_relative_and_lazy_imports_are_resolved(tmp_path, monkeypatch):
    tool = _graph_tool()
    pkg = tmp_path / "metric"
    (pkg / "retrieval").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data.py").write_text("def f():\n    from .retrieval import search\n")
    (pkg / "retrieval" / "__init__.py").write_text("from .search import run\n")
    (pkg / "retrieval" / "search.py").write_text("from ..data import f\nimport metric.data as d\n")
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    monkeypatch.setattr(tool, "PACKAGES", ("metric",))
    graph = tool.edges()
    assert ("metric.data", "metric.retrieval.search") in graph
    assert ("metric.retrieval", "metric.retrieval.search") in graph
    assert ("metric.retrieval.search", "metric.data") in graph
    assert any(line.startswith("import cycle") for line in tool.violations(graph))
