"""The size limits docs/design.md keeps the package to (issue 26): small modules with one
job, functions a reader can hold at once, the layer-parallel trainer only wiring."""
import ast

import pytest

from conftest import ROOT

pytestmark = pytest.mark.quick

MODULE_LINES, FUNCTION_LINES, TRAINER_LINES = 350, 60, 250


def _modules():
    return sorted((ROOT / "hpcaux").rglob("*.py"))


def test_no_module_is_over_350_lines_and_the_trainer_over_250():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := p.read_text().count("\n")) > MODULE_LINES}
    assert not long
    assert (ROOT / "hpcaux" / "train" / "layer_parallel.py").read_text().count("\n") <= TRAINER_LINES


def test_no_function_is_over_60_lines():
    long = [f"{p.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1})"
            for p in _modules() for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > FUNCTION_LINES]
    assert not long
