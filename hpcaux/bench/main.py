"""`hpcaux bench`: run the methods (runner), then the cost model, then the report."""
from __future__ import annotations

import json
from pathlib import Path

from hpcaux.bench.cost_model import GPU_MACS_PER_S, aux_scale_from_bench, project
from hpcaux.bench.report import projection_header, projection_table, write_report
from hpcaux.bench.runner import check_bench_dir, run_bench
from hpcaux.bench.spec import load_bench
from hpcaux.config import load_config
from hpcaux.data.sets import image_size
from hpcaux.errors import UserError


def bench(bench_file: str, out: Path, quick: bool, reuse: bool, overwrite: bool, model_only: bool,
          overrides: list[str], K: int | None = None) -> str:
    """Run the bench (or only the projection); returns what to print. `K` replaces the
    bench file's K (the same methods at another stage count)."""
    spec = load_bench(bench_file)
    if K is not None:
        if K < 2:
            raise UserError(f"hpcaux bench: --K must be >= 2, got {K}")
        spec.K = K
    cfg = load_config(spec.base, spec.overrides + overrides)
    results_file = out / "results.json"
    if model_only:
        results = json.loads(results_file.read_text()) if results_file.exists() else None
        projections = _projections(cfg, results)
        out.mkdir(parents=True, exist_ok=True)
        text = (f"{projection_header(projections['rate'], projections['aux_scale'])}\n\n"
                f"{projection_table(projections['rows'])}\n")
        (out / "cost_model.md").write_text(text)
        return text
    check_bench_dir(out, reuse, overwrite)
    results = run_bench(spec, out, quick, reuse, overrides)
    report = write_report(results, out, _projections(cfg, results))
    return report.read_text()


def _projections(cfg, results: dict | None) -> dict:
    """The cost model's table; the AuxNet time scale is calibrated on the bench's own model
    and image size (an ImageNet-folder bench at 128 px is not a CIFAR one at 32)."""
    scale = (aux_scale_from_bench(results, cfg.auxnet.width, cfg.auxnet.depth, cfg.model.arch,
                                  size=image_size(cfg.data))
             if results else 1.0)
    return {"rate": GPU_MACS_PER_S, "aux_scale": scale,
            "rows": project(cfg.auxnet.width, cfg.auxnet.depth, GPU_MACS_PER_S, aux_scale=scale)}
