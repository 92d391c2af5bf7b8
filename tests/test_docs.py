"""The documents stay true to the code: every error message is in docs/troubleshooting.md."""
import re

import pytest

from conftest import ROOT

LITERAL = re.compile(r'UserError\(\s*f?"([^"]*)"')

pytestmark = pytest.mark.quick


def error_messages() -> list[tuple[str, str]]:
    found = []
    for path in sorted((ROOT / "hpcaux").rglob("*.py")):
        found += [(str(path.relative_to(ROOT)), m.group(1)) for m in LITERAL.finditer(path.read_text())]
    return found


def test_every_error_message_is_in_troubleshooting():
    doc = (ROOT / "docs" / "troubleshooting.md").read_text()
    messages = error_messages()
    assert len(messages) > 50
    missing = []
    for where, message in messages:
        fixed = max(re.split(r"\{[^}]*\}", message), key=len).strip()
        if fixed not in doc:
            missing.append(f"{where}: {fixed!r}")
    assert not missing, "\n".join(missing)


def test_the_design_is_cited_from_the_repository_itself():
    """Code and docs cite docs/design.md, never a design file outside the repository."""
    outside = re.compile(r"(?<![\w/])DESIGN\.md")
    citing = [str(p.relative_to(ROOT)) for folder in ("hpcaux", "docs", "tests", "slurm", "scripts", "configs")
              for p in sorted((ROOT / folder).rglob("*")) if p.is_file() and p.suffix in (".py", ".md", ".sh", ".yaml")
              and outside.search(p.read_text())]
    citing += ["README.md"] if outside.search((ROOT / "README.md").read_text()) else []
    assert citing == [], citing
    assert (ROOT / "docs" / "design.md").is_file()


def test_the_timetable_grids_in_the_design_are_what_the_code_renders():
    from hpcaux.train.lp.schedule import Plan, render

    doc = (ROOT / "docs" / "design.md").read_text()
    shown = re.findall(r"`(Plan\([^`]*\))`\n\n((?:    stage \d+:.*\n)+)", doc)
    assert len(shown) == 6
    for plan, grid in shown:
        assert "\n".join(line[4:] for line in grid.splitlines()) == render(eval(plan, {"Plan": Plan})), plan


def test_the_result_tables_are_what_their_results_files_say():
    """Every table of docs/tables.yaml, as `hpcaux bench report` renders it from the
    committed docs/bench/*/results.json, is the one in its document."""
    from hpcaux.bench.doc_tables import refresh

    assert refresh(ROOT, check=True) == []
