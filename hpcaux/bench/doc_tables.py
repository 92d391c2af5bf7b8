"""The result tables of docs/*.md, generated from the committed bench results.

docs/tables.yaml names each table: the document it sits in, its reference row and its
rows, each row one method of one or more bench directories (one per seed). A table sits
in its document between `<!-- table NAME ... -->` and `<!-- end table -->`;
`hpcaux bench report` rewrites it there, and `--check` (and tests/test_docs.py) fails
when a committed number differs from its file. So a number in a table is never typed by
hand, and a table of several seeds applies the protocol rule of docs/benchmarks.md
itself: a difference under two standard deviations is printed as a tie. The cost model's
columns (timetable, predicted, error, waits) play a row's own timetable with its measured
times (cost_model.measured_vs_predicted); a `projection:` table is the GPU projection of
`hpcaux bench --model`, from its projection.json; a `report:` table is a bench's results
table as its results.md shows it.
"""
from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hpcaux.bench.cost_model import measured_vs_predicted, stage_imbalance
from hpcaux.bench.report import imbalance_cell, per_rank, projection_table, results_table, time_to_accuracy
from hpcaux.errors import UserError

BLOCK = re.compile(r"(<!-- table (?P<name>[\w-]+)[^>]*-->\n)(?P<body>.*?)(<!-- end table -->)", re.S)
COLUMNS = {"val": "val acc (last epoch)", "test": "test acc", "delta": "Δ test vs {ref}",
           "seeds": "test acc per seed", "speedup": "samples/s vs {ref}", "samples": "samples/s",
           "step": "step ms", "stages": "stage ms per rank", "cut": "cut", "imbalance": "imbalance timed / trained",
           "reach": "time to {ref}'s accuracy", "timetable": "timetable, M", "predicted": "predicted step ms",
           "error": "model error", "waits": "wait ms per rank, predicted / measured", "seed": "seed",
           "late": "training s from epoch {late}"}
MODEL_COLUMNS = ("timetable", "predicted", "error", "waits")


@dataclass
class Row:
    label: str
    method: str
    benches: list[str]
    note: str = ""


@dataclass
class Table:
    name: str
    doc: str
    columns: list[str]
    rows: list[Row]
    reference: int = 0
    note: str = ""            # the header of the rows' free-text column, if any
    projection: str = ""      # a bench directory whose projection.json is the table (hpcaux bench --model)
    report: str = ""          # a bench directory whose results table (as in its results.md) is the table
    late_from: int = 0        # the first epoch the `late` column times (the quiet epochs of a disturbed run)
    results: dict = field(default_factory=dict, repr=False)   # bench directory -> results.json
    models: dict = field(default_factory=dict, repr=False)    # bench directory -> method -> cost model row


def load_tables(spec_file: Path) -> list[Table]:
    """docs/tables.yaml, checked: every column known (a row's results file is checked when
    the table is rendered, `_read_results`)."""
    try:
        spec = yaml.safe_load(spec_file.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read the table spec {spec_file}: {err}")
    tables = []
    for name, body in (spec or {}).get("tables", {}).items():
        unknown = [c for c in body.get("columns", []) if c not in COLUMNS]
        if unknown:
            raise UserError(f"table {name} in {spec_file}: unknown column {unknown[0]!r} (known: {', '.join(COLUMNS)})")
        rows = [Row(r["label"], r["method"], [r["bench"]] if isinstance(r["bench"], str) else list(r["bench"]),
                    r.get("note", "")) for r in body.get("rows", [])]
        tables.append(Table(name, body["doc"], list(body.get("columns", [])), rows, body.get("reference", 0),
                            body.get("note", ""), body.get("projection", ""), body.get("report", ""),
                            body.get("late_from", 0)))
    return tables


def _read_results(table: Table, bench_root: Path):
    for row in table.rows:
        for bench in row.benches:
            if bench not in table.results:
                path = bench_root / bench / "results.json"
                if not path.is_file():
                    raise UserError(f"table {table.name}: row {row.label!r} names {path}, which does not exist")
                table.results[bench] = json.loads(path.read_text())


def _per_bench(table: Table, row: Row, key: str) -> list[float | None]:
    """The row's `key` in each of its benches, None where the bench has not run the method."""
    found = []
    for bench in row.benches:
        rec = table.results[bench]["methods"].get(row.method)
        found.append(rec.get(key) if rec is not None and "error" not in rec else None)
    return found


def _values(table: Table, row: Row, key: str) -> list[float]:
    return [v for v in _per_bench(table, row, key) if v is not None]


def _mean_std(values: list[float], digits: int) -> str:
    if not values:
        return "not yet run"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"  # one seed, or the others not yet run (the seeds column says which)
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} ({len(values)} seeds)"


def _delta(table: Table, row: Row) -> str:
    """Test accuracy against the reference row in points; with two seeds or more on both
    sides, a difference under twice the larger standard deviation is called a tie."""
    mine, ref = _values(table, row, "test_acc"), _values(table, table.rows[table.reference], "test_acc")
    if row is table.rows[table.reference] or not mine or not ref:
        return "–"
    diff = (statistics.mean(mine) - statistics.mean(ref)) * 100
    if min(len(mine), len(ref)) < 2:
        return f"{diff:+.1f} pt (one seed)"
    spread = 2 * max(statistics.stdev(mine), statistics.stdev(ref)) * 100
    return f"{diff:+.1f} pt" + (" (tie)" if abs(diff) < spread else "")


def _speedup(table: Table, row: Row) -> str:
    """Samples/s against the reference row's method, only between rows of one bench
    invocation: per invocation (seed) of the row where the reference method ran too, then
    their mean ± standard deviation over those invocations; marked where a row was reused
    from an earlier invocation."""
    ref_row = table.rows[table.reference]
    common = [b for b in row.benches if ref_row.method in table.results[b]["methods"]]
    if not common:
        return "other bench"
    ratios, reused = [], ""
    for bench in common:
        methods = table.results[bench]["methods"]
        mine, ref = methods.get(row.method), methods.get(ref_row.method)
        if not mine or not ref or "error" in mine or "error" in ref:
            continue
        ratios.append(mine["samples_per_s"] / ref["samples_per_s"])
        reused = " (a row reused)" if mine.get("reused") or ref.get("reused") else reused
    if not ratios:
        return "–"
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}×{reused}"
    return f"{statistics.mean(ratios):.2f}× ± {statistics.stdev(ratios):.2f} ({len(ratios)} invocations){reused}"


def _time_to_reference(table: Table, row: Row) -> str:
    """Training seconds until the row's held-out accuracy first reaches the reference row's
    final one, within one bench invocation (as `hpcaux bench` reports it)."""
    ref_row = table.rows[table.reference]
    if row.benches[0] != ref_row.benches[0]:
        return "other bench"
    methods = table.results[row.benches[0]]["methods"]
    mine, ref = methods.get(row.method), methods.get(ref_row.method)
    if not mine or not ref or "error" in mine or "error" in ref or not ref.get("curve"):
        return "–"
    reached = time_to_accuracy(mine["curve"], ref["curve"][-1][1])
    return f"{reached:.0f} s" if reached is not None else "not reached"


def _cost(table: Table, row: Row, column: str) -> str:
    """The speed columns, from the row's first bench (one invocation, like the speedup);
    `–` where the method has no such number (no stages, no cut)."""
    rec = table.results[row.benches[0]]["methods"].get(row.method)
    if rec is None or "error" in rec:
        return "–"
    stages = rec.get("stage_ms_per_rank") if rec.get("ranks", 1) > 1 else None
    if column == "samples":
        return f"{rec['samples_per_s']:.0f}"
    if column == "step":
        return f"{rec['step_ms']:.0f}"
    if column == "stages":
        return per_rank(stages) if stages else "–"
    if column == "cut":
        return str(rec["cuts"]) if rec.get("cuts") else "–"
    if not stages or rec.get("cut_imbalance") is None:
        return "–"
    return imbalance_cell(rec["cut_imbalance"], stage_imbalance(stages))


def _model(table: Table, row: Row, column: str) -> str:
    """The cost model against the row's first bench (cost_model.measured_vs_predicted)."""
    bench = row.benches[0]
    if bench not in table.models:
        table.models[bench] = {r["method"]: r for r in measured_vs_predicted(table.results[bench])}
    r = table.models[bench].get(row.method)
    if r is None:
        return "–"
    if column == "timetable":
        return f"{r['timetable']}, {r['microbatches']}"
    if column == "predicted":
        return f"{r['predicted_step_ms']:.0f}"
    if column == "error":
        return f"{100 * r['error']:+.1f} %"
    return f"{per_rank(r['predicted_wait_ms'])} / {per_rank(r['measured_wait_ms'])}"


def _seed(table: Table, row: Row) -> str:
    seeds = []
    for bench in row.benches:
        overrides = table.results[bench].get("overrides", [])
        seeds.append(next((o.split("=", 1)[1] for o in overrides if o.startswith("seed=")), "0"))
    return " / ".join(seeds)


def _late(table: Table, row: Row) -> str:
    """Training seconds from epoch `late_from` on (the row's first bench): the quiet part
    of a run whose first epochs shared the machine."""
    rec = table.results[row.benches[0]]["methods"].get(row.method)
    curve = rec.get("curve") if rec and "error" not in rec else None
    if not curve or len(curve) < table.late_from:
        return "–"
    return f"{curve[-1][0] - curve[table.late_from - 2][0]:.1f} s"


def _cell(table: Table, row: Row, column: str) -> str:
    if column == "val":
        return _mean_std(_values(table, row, "val_acc"), 3)
    if column == "test":
        return _mean_std(_values(table, row, "test_acc"), 4)
    if column == "seeds":
        return " / ".join("not yet run" if v is None else f"{v:.4f}" for v in _per_bench(table, row, "test_acc"))
    if column == "delta":
        return _delta(table, row)
    if column == "speedup":
        return _speedup(table, row)
    if column == "reach":
        return _time_to_reference(table, row)
    if column in MODEL_COLUMNS:
        return _model(table, row, column)
    if column == "seed":
        return _seed(table, row)
    if column == "late":
        return _late(table, row)
    return _cost(table, row, column)


def render(table: Table, bench_root: Path) -> str:
    """The table's markdown, one line per row, ending in a newline."""
    if table.projection:
        path = bench_root / table.projection / "projection.json"
        if not path.is_file():
            raise UserError(f"table {table.name}: {path} does not exist (hpcaux bench --model --out {path.parent})")
        return projection_table(json.loads(path.read_text())) + "\n"
    if table.report:
        path = bench_root / table.report / "results.json"
        if not path.is_file():
            raise UserError(f"table {table.name}: {path} does not exist")
        return results_table(json.loads(path.read_text())) + "\n"
    _read_results(table, bench_root)
    ref = table.rows[table.reference].label
    header = ["method"] + [COLUMNS[c].format(ref=ref, late=table.late_from) for c in table.columns] + ([table.note] if table.note else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        cells = [row.label] + [_cell(table, row, c) for c in table.columns] + ([row.note] if table.note else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def refresh(root: Path, check: bool) -> list[str]:
    """Render every table of ROOT/docs/tables.yaml into its document (or, with `check`,
    only compare); returns the names of the tables that were (or would be) rewritten."""
    tables = load_tables(root / "docs" / "tables.yaml")
    unplaced = sorted({t.doc for t in tables} - {"README.md"} - {f"docs/{p.name}" for p in (root / "docs").glob("*.md")})
    if unplaced:
        raise UserError(f"docs/tables.yaml places a table in {unplaced[0]}, which is not README.md or docs/*.md")
    stale, rewrites = [], {}
    for path in [root / "README.md"] + sorted((root / "docs").glob("*.md")):
        doc = str(path.relative_to(root))
        text = path.read_text()
        present = {m.group("name") for m in BLOCK.finditer(text)}
        mine = {t.name: t for t in tables if t.doc == doc}
        missing = sorted(set(mine) - present)
        if missing:
            raise UserError(f"{doc} has no block <!-- table {missing[0]} --> ... <!-- end table --> for that table")
        stray = sorted(present - set(mine))
        if stray:
            raise UserError(f"{doc} has a block for table {stray[0]}, which docs/tables.yaml does not place there")

        def fill(match):
            body = render(mine[match.group("name")], root / "docs" / "bench")
            if body != match.group("body"):
                stale.append(match.group("name"))
            return match.group(1) + body + match.group(4)

        updated = BLOCK.sub(fill, text)
        if updated != text:
            rewrites[path] = updated
    if not check:  # only once every table rendered: a bad row leaves every document as it was
        for path, text in rewrites.items():
            path.write_text(text)
    return stale
