"""`hpcaux bench report`: the docs' result tables come from the results files.

Each test builds a small repository (README.md, docs/, docs/bench/*/results.json) in a
temporary folder and runs the real command on it; the repository's own tables are
checked in tests/test_docs.py.
"""
import json

import pytest

from conftest import HPCAUX, run

pytestmark = pytest.mark.quick

SPEC = """tables:
  seeds:
    doc: docs/accuracy.md
    columns: [seeds, test, delta, speedup]
    rows:
      - {label: serial, method: serial, bench: [a, b]}
      - {label: close, method: close, bench: [a, b]}
      - {label: behind, method: behind, bench: [a, b]}
      - {label: half-run, method: late, bench: [a, b]}
"""
DOC = "# Accuracy\n\nBefore.\n\n<!-- table seeds: generated -->\n| stale |\n<!-- end table -->\n\nAfter.\n"


def _results(methods: dict) -> dict:
    return {"methods": {name: {"test_acc": acc, "val_acc": acc, "samples_per_s": speed, "reused": False}
                        for name, (acc, speed) in methods.items()}}


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "docs" / "bench" / "a").mkdir(parents=True)
    (tmp_path / "docs" / "bench" / "b").mkdir()
    (tmp_path / "README.md").write_text("# readme\n")
    (tmp_path / "docs" / "tables.yaml").write_text(SPEC)
    (tmp_path / "docs" / "accuracy.md").write_text(DOC)
    seed0 = {"serial": (0.70, 100.0), "close": (0.71, 150.0), "behind": (0.60, 50.0), "late": (0.65, 80.0)}
    seed1 = {"serial": (0.72, 110.0), "close": (0.69, 160.0), "behind": (0.61, 55.0)}
    (tmp_path / "docs" / "bench" / "a" / "results.json").write_text(json.dumps(_results(seed0)))
    (tmp_path / "docs" / "bench" / "b" / "results.json").write_text(json.dumps(_results(seed1)))
    return tmp_path


def _report(repo, *args):
    return run([HPCAUX, "bench", "report", "--root", str(repo), *args], timeout=60)


def _rendered(repo, spec: str) -> list[str]:
    """The lines of docs/accuracy.md after `hpcaux bench report` with the table spec `spec`."""
    (repo / "docs" / "tables.yaml").write_text(spec)
    proc = _report(repo)
    assert proc.returncode == 0, proc.stderr
    return (repo / "docs" / "accuracy.md").read_text().splitlines()


def test_the_report_writes_mean_std_and_the_protocol_rule_into_the_block(repo):
    assert _report(repo, "--check").returncode == 2
    proc = _report(repo)
    assert proc.returncode == 0, proc.stderr
    text = (repo / "docs" / "accuracy.md").read_text()
    assert text.startswith("# Accuracy\n\nBefore.\n\n<!-- table seeds: generated -->\n") and text.endswith(
        "<!-- end table -->\n\nAfter.\n")
    lines = text.splitlines()
    # the speed is a ratio within each invocation, then their mean ± std
    assert "| serial | 0.7000 / 0.7200 | 0.7100 ± 0.0141 (2 seeds) | – | 1.00× ± 0.00 (2 invocations) |" in lines
    # one point apart, under twice the larger standard deviation (2.8 points): a tie
    assert "| close | 0.7100 / 0.6900 | 0.7000 ± 0.0141 (2 seeds) | -1.0 pt (tie) | 1.48× ± 0.03 (2 invocations) |" in lines
    assert "| behind | 0.6000 / 0.6100 | 0.6050 ± 0.0071 (2 seeds) | -10.5 pt | 0.50× ± 0.00 (2 invocations) |" in lines
    # a seed not yet run is named, and the difference is marked as resting on one seed
    assert "| half-run | 0.6500 / not yet run | 0.6500 | -6.0 pt (one seed) | 0.80× |" in lines
    assert _report(repo, "--check").returncode == 0
    assert "every table matches" in _report(repo).stdout


def test_a_hand_edited_number_fails_the_check_and_is_restored(repo):
    _report(repo)
    doc = repo / "docs" / "accuracy.md"
    good = doc.read_text()
    doc.write_text(good.replace("0.6050 ± 0.0071", "0.6150 ± 0.0071"))
    proc = _report(repo, "--check")
    assert proc.returncode == 2 and "tables differ from their results files: seeds" in proc.stderr
    assert _report(repo).returncode == 0 and doc.read_text() == good


@pytest.mark.parametrize("edit,message", [
    (lambda r: (r / "docs" / "tables.yaml").write_text(SPEC.replace("[seeds, test", "[seeds, tset")),
     "unknown column 'tset'"),
    (lambda r: (r / "docs" / "tables.yaml").write_text(SPEC.replace("bench: [a, b]}\n      - {label: half",
                                                                    "bench: [a, c]}\n      - {label: half")),
     "names "),
    (lambda r: (r / "docs" / "accuracy.md").write_text("# no block\n"), "has no block <!-- table seeds -->"),
    (lambda r: (r / "README.md").write_text("<!-- table old: x -->\n| 1 |\n<!-- end table -->\n"),
     "README.md has a block for table old"),
    (lambda r: (r / "docs" / "tables.yaml").write_text(SPEC.replace("docs/accuracy.md", "notes.md")),
     "places a table in notes.md"),
    (lambda r: (r / "docs" / "tables.yaml").unlink(), "cannot read the table spec"),
])
def test_a_bad_spec_or_document_is_one_error_line_and_nothing_is_written(repo, edit, message):
    edit(repo)
    before = (repo / "docs" / "accuracy.md").read_text()
    proc = _report(repo)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert (repo / "docs" / "accuracy.md").read_text() == before


def test_the_speed_columns_show_stages_cut_imbalances_and_time_to_the_reference_accuracy(repo):
    """A layer-parallel row shows its stage times, its cut and the imbalance as timed
    before training and as trained (slowest stage over the mean); a serial row has none.
    Time to accuracy: training seconds until the row's curve first reaches the reference
    row's final accuracy."""
    results = _results({"serial": (0.70, 100.0), "close": (0.71, 150.0)})
    results["methods"]["serial"].update(ranks=1, step_ms=400.0, curve=[[10.0, 0.5], [20.0, 0.7]])
    results["methods"]["close"].update(ranks=2, step_ms=250.4, stage_ms_per_rank=[180.2, 220.0], cuts=[4],
                                       cut_imbalance=0.051, curve=[[8.0, 0.6], [16.0, 0.72]])
    (repo / "docs" / "bench" / "a" / "results.json").write_text(json.dumps(results))
    lines = _rendered(repo, """tables:
  seeds:
    doc: docs/accuracy.md
    columns: [samples, step, stages, cut, imbalance, reach]
    rows:
      - {label: serial, method: serial, bench: a}
      - {label: close, method: close, bench: a}
""")
    assert "| serial | 100 | 400 | – | – | – | 20 s |" in lines
    assert "| close | 150 | 250 | 180/220 | [4] | 5.1 % / 9.9 % | 16 s |" in lines


def test_rows_of_several_invocations_take_each_ones_reference_and_name_its_seed(repo):
    """A speed ratio stays within one invocation: a row of another bench is set against the
    reference method of its own bench. `late`: training seconds from epoch late_from on."""
    seed0 = _results({"serial": (0.70, 100.0), "close": (0.71, 150.0)})
    seed1 = _results({"serial": (0.72, 120.0), "close": (0.69, 60.0)})
    seed1["overrides"] = ["train.epochs=3", "seed=1"]
    for results in (seed0, seed1):
        results["methods"]["close"]["curve"] = [[10.0, 0.5], [25.0, 0.6], [45.0, 0.7]]
    (repo / "docs" / "bench" / "a" / "results.json").write_text(json.dumps(seed0))
    (repo / "docs" / "bench" / "b" / "results.json").write_text(json.dumps(seed1))
    lines = _rendered(repo, """tables:
  seeds:
    doc: docs/accuracy.md
    columns: [seed, speedup, late]
    late_from: 3
    rows:
      - {label: serial, method: serial, bench: a}
      - {label: close, method: close, bench: a}
      - {label: close, method: close, bench: b}
""")
    assert "| method | seed | samples/s vs serial | training s from epoch 3 |" in lines
    assert "| serial | 0 | 1.00× | – |" in lines
    assert "| close | 0 | 1.50× | 20.0 s |" in lines and "| close | 1 | 0.50× | 20.0 s |" in lines


def test_a_projection_table_comes_from_its_projection_file(repo):
    row = {"model": "resnet56", "image": 32, "batch": 128, "K": 4, "serial_ms": 13.04}
    for name, (m, speedup) in {"gpipe": (4, 1.22), "pipeline": (4, 2.151), "auxnet": (1, 3.3), "relay": (1, 1.38)}.items():
        row[name] = {"microbatches": m, "step_ms": 13.04 / speedup, "speedup": speedup}
    (repo / "docs" / "tables.yaml").write_text("tables:\n  seeds:\n    doc: docs/accuracy.md\n    projection: p\n")
    proc = _report(repo)
    assert proc.returncode == 2 and "p/projection.json does not exist (hpcaux bench --model" in proc.stderr
    (repo / "docs" / "bench" / "p").mkdir()
    (repo / "docs" / "bench" / "p" / "projection.json").write_text(json.dumps({"rows": [row]}))
    lines = _rendered(repo, "tables:\n  seeds:\n    doc: docs/accuracy.md\n    projection: p\n")
    assert "| resnet56 | 32 | 128 | 4 | 13.0 | 1.22× | 2.15× | 3.30× | 1.38× |" in lines
