"""`hpcaux bench`: run the methods (runner), then the report with the cost model; or,
with --model, only the GPU projection of the cost model."""
from __future__ import annotations

import json
from pathlib import Path

from hpcaux.bench.cost_model import projection
from hpcaux.bench.report import projection_header, projection_table, write_report
from hpcaux.bench.runner import check_bench_dir, run_bench
from hpcaux.bench.spec import load_bench
from hpcaux.errors import UserError


def bench(bench_file: str | None, out: Path, quick: bool, reuse: bool, overwrite: bool, model_only: bool,
          overrides: list[str], K: int | None = None, max_epochs: int | None = None) -> str:
    """Run the bench (or only the projection); returns what to print. `K` replaces the
    bench file's K (the same methods at another stage count); `max_epochs` caps the epochs
    a layer-parallel method trains in this invocation (a long campaign in pieces)."""
    if model_only:   # one projection for every bench: it depends on no bench file
        projected = projection()
        out.mkdir(parents=True, exist_ok=True)
        (out / "projection.json").write_text(json.dumps(projected, indent=1))
        text = f"{projection_header(projected)}\n\n{projection_table(projected)}\n"
        (out / "cost_model.md").write_text(text)
        return text
    if bench_file is None:
        raise UserError("hpcaux bench: --config BENCH_FILE is needed (only --model runs without one)")
    spec = load_bench(bench_file)
    if K is not None:
        if K < 2:
            raise UserError(f"hpcaux bench: --K must be >= 2, got {K}")
        spec.K = K
    if max_epochs is not None and max_epochs < 1:
        raise UserError(f"hpcaux bench: --max-epochs must be >= 1, got {max_epochs}")
    check_bench_dir(out, reuse, overwrite)
    results = run_bench(spec, out, quick, reuse, overrides, max_epochs)
    return write_report(results, out).read_text()
