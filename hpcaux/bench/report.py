"""BENCH/results.md and the plots, from BENCH/results.json."""
from __future__ import annotations

from pathlib import Path

from hpcaux.bench.cost_model import CPU_LINK_BPS, measured_vs_predicted


def per_rank(values) -> str:
    """Per-rank numbers as 12/34 (no "-0" for a model's rounding below zero)."""
    return "/".join(str(round(v) + 0) for v in values) if values else "–"


def results_table(results: dict) -> str:
    ref = results["methods"][results["reference"]]
    lines = ["| method | ranks × threads | samples/s | speedup vs 1 | step ms | stage ms per rank | "
             "AuxNet ms | comm ms | idle ms | peak MB per rank | test acc | Δ acc vs 1 | epochs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, (name, rec) in enumerate(results["methods"].items(), start=1):
        if "error" in rec:
            lines.append(f"| {i}. {rec['label']} | {rec['ranks']} | failed: {rec['error']} |" + " |" * 10)
            continue
        speedup = rec["samples_per_s"] / ref["samples_per_s"] if "error" not in ref else float("nan")
        diff = (rec["test_acc"] - ref["test_acc"]) * 100 if "error" not in ref else float("nan")
        reused = " (reused: ran before this invocation)" if rec.get("reused") else \
            " (resumed: its speed is this invocation's part)" if rec.get("resumed") else ""
        lines.append(
            f"| {i}. {rec['label']}{reused} | {rec['ranks']} × {rec['threads']} | {rec['samples_per_s']:.0f} | "
            f"{speedup:.2f}× | {rec['step_ms']:.0f} | {per_rank(rec['stage_ms_per_rank'])} | {per_rank(rec['aux_ms_per_rank'])} | "
            f"{per_rank(rec['comm_ms_per_rank'])} | {per_rank(rec['idle_ms_per_rank'])} | {per_rank(rec['peak_mem_mb_per_rank'])} | "
            f"{rec['test_acc']:.4f} | {diff:+.2f} pt | {rec['epochs']} |")
    return "\n".join(lines)


def time_to_accuracy(curve: list, target: float) -> float | None:
    """Training seconds until the held-out accuracy of a per-epoch curve [[s, acc], ...]
    first reaches `target` (None: never)."""
    return next((t for t, acc in curve if acc is not None and acc >= target), None)


def accuracy_table(results: dict) -> str:
    """The accuracy view of every method (docs/accuracy.md): time to accuracy is the
    training time until the per-epoch held-out accuracy (the validation split's where the
    runs have one) first reaches method 1's final one."""
    ref = results["methods"][results["reference"]]
    target = ref["curve"][-1][1] if "error" not in ref and ref.get("curve") else None
    lines = ["| method | val acc (last epoch) | test acc (composed) | Δ vs serial | AuxNet-path acc | relative gap per boundary | "
             "AuxNet / stage time | speedup | time to serial's accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rec in results["methods"].items():
        if "error" in rec or "error" in ref:
            continue
        aux = f"{rec['auxnet_path_acc']:.4f}" if rec.get("auxnet_path_acc") is not None else "–"
        gaps = ", ".join(f"{g:.3f}" for g in rec["final_rel_gap"]) if rec.get("final_rel_gap") else "–"
        cost = f"{rec['aux_fraction_of_stage']:.3f}" if rec.get("aux_fraction_of_stage") is not None else "–"
        reached = time_to_accuracy(rec["curve"], target) if target is not None else None
        when = f"{reached:.0f} s" if reached is not None else "not reached"
        val = f"{rec['val_acc']:.4f}" if rec.get("val_acc") is not None else "–"
        lines.append(f"| {name} | {val} | {rec['test_acc']:.4f} | {(rec['test_acc'] - ref['test_acc']) * 100:+.2f} pt | {aux} | "
                     f"{gaps} | {cost} | {rec['samples_per_s'] / ref['samples_per_s']:.2f}× | {when} |")
    return "\n".join(lines)


def model_table(results: dict) -> str:
    rows = measured_vs_predicted(results)   # imbalance = slowest stage over the mean: timed before training, trained
    if not rows:
        return "(no layer-parallel method without a fine-tune finished)"
    lines = ["| method | timetable, M | stage ms per rank | predicted step ms | measured step ms | error | "
             "predicted wait ms per rank | measured wait ms per rank | fill + drain ms an epoch | "
             "imbalance timed / trained |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['timetable']}, {r['microbatches']} | {per_rank(r['stage_ms'])} | "
                     f"{r['predicted_step_ms']:.0f} | {r['measured_step_ms']:.0f} | {100 * r['error']:+.1f} % | "
                     f"{per_rank(r['predicted_wait_ms'])} | {per_rank(r['measured_wait_ms'])} | {r['fill_drain_ms']:.0f} | "
                     f"{imbalance_cell(r['imbalance_timed'], r['imbalance_trained'])} |")
    return "\n".join(lines)


def imbalance_cell(timed: float | None, trained: float) -> str:
    """The cut's imbalance (slowest stage over the mean) as timed before training and as
    trained, in per cent."""
    return f"{'–' if timed is None else f'{100 * timed:.1f} %'} / {100 * trained:.1f} %"


PROJECTED_LABELS = {"gpipe": "GPipe", "pipeline": "pipeline (K = 2 default)", "auxnet": "AuxNet alone",
                    "relay": "AuxNet relay (K = 4 config)"}


def projection_table(projection: dict) -> str:
    """The GPU projection of cost_model.projection(): speedup over serial backprop on one
    GPU per model, K and method (M = the method's micro-batches)."""
    first = projection["rows"][0]
    lines = ["| model | image | batch | K | serial ms | " +
             " | ".join(f"{PROJECTED_LABELS[n]}, M = {first[n]['microbatches']}" for n in PROJECTED_LABELS) + " |",
             "|---|---|---|---|---|" + "---|" * len(PROJECTED_LABELS)]
    for r in projection["rows"]:
        lines.append(f"| {r['model']} | {r['image']} | {r['batch']} | {r['K']} | {r['serial_ms']:.1f} | " +
                     " | ".join(f"{r[n]['speedup']:.2f}×" for n in PROJECTED_LABELS) + " |")
    return "\n".join(lines)


def projection_header(projection: dict) -> str:
    a = projection["assumptions"]
    return (f"**A projection, not a measurement** (no GPU has run hpcaux): compute at {a['macs_per_s'] / 1e12:.1f} TMAC/s "
            f"(forward + backward = 3 × forward MACs) plus {a['layer_pass_s'] * 1e6:.0f} µs per layer and pass "
            f"whatever the micro-batch; the AuxNet (width {a['auxnet_width']}, depth {a['auxnet_depth']}) at "
            f"{a['aux_time_per_mac']:.1f} × the stages' time per MAC, as measured in docs/bench/{a['aux_calibration']}; "
            f"messages and the ring allreduce at {a['link_bps'] / 1e9:.0f} GB/s and {a['latency_s'] * 1e6:.0f} µs "
            "per message; each method's own timetable (waits, fill and drain included).")


def render_report(results: dict) -> str:
    """BENCH/results.md's text (the plots are apart: write_report)."""
    m = results["machine"]
    text = [f"# hpcaux bench: {Path(results['base']).name}, K = {results['K']}"
            f"{' (quick mode)' if results['quick'] else ''}", "",
            f"Command: `{results['command']}`", "",
            f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; torch {m['torch']}, "
            f"Python {m['python']}. Date: {results['date']}.", "",
            f"Every method: {results['train_subset'] or 'all'} training images, {results['epochs']} epochs, global "
            f"batch {results['batch_size']}, the same seed and schedule; overrides {results['overrides']}. "
            "Speedup and Δ accuracy are against method 1. Step ms = global batch / samples per second; "
            "idle = a rank's allreduce time above the fastest rank's (waiting for the slowest stage).", "",
            results_table(results), "",
            "## Accuracy", "",
            "Composed = the network a user gets, evaluated as F_K ∘ … ∘ F_1; AuxNet path = the last stage fed "
            "by the AuxNet; relative gap = ‖F_k(z_(k-1)) − z_k‖ / ‖z_k‖ on held-out images; AuxNet / stage = the "
            "AuxNet's share of a step against the stage's (largest over ranks); speedup over the whole run, "
            "fine-tune epochs included; time to serial's accuracy = training seconds until the held-out "
            "accuracy (per epoch) first reaches method 1's final held-out accuracy.", "",
            accuracy_table(results), "",
            "## Cost model (docs/design.md §6) against the measurement", "",
            "Each method's timetable played with its ranks' measured stage, AuxNet and per-step times; the "
            "allreduce at the fastest rank's communication time, a message at its bytes over "
            f"{CPU_LINK_BPS / 1e9:.0f} GB/s. Wait = a rank's communication time above the fastest rank's.", "",
            model_table(results), "",
            "The GPU projection, the same for every bench: docs/benchmarks.md (`hpcaux bench --model`).", "",
            "![samples per second](throughput.png)", "", "![accuracy against training time](accuracy_vs_time.png)", "",
            "![accuracy against speedup](accuracy_vs_speedup.png)", ""]
    return "\n".join(text)


def write_report(results: dict, out: Path) -> Path:
    path = out / "results.md"
    path.write_text(render_report(results))
    _plots(results, out)
    return path


def _plots(results: dict, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {n: r for n, r in results["methods"].items() if "error" not in r}
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(done)
    ax.barh(names, [done[n]["samples_per_s"] for n in names], color="tab:blue")
    ref = done.get(results["reference"])
    for i, n in enumerate(names):
        label = f"{done[n]['samples_per_s']:.0f}" + (f" ({done[n]['samples_per_s'] / ref['samples_per_s']:.2f}×)" if ref else "")
        ax.text(done[n]["samples_per_s"], i, " " + label, va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("training samples per second")
    ax.set_title(f"K = {results['K']}: throughput")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, r in done.items():
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(xs, ys, marker="o", ms=3, label=n)
    ax.set_xlabel("training time (s, evaluation excluded)")
    ax.set_ylabel("held-out accuracy (composed network)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_time.png", dpi=120)
    plt.close(fig)
    if ref:  # every method a point: what each buys in accuracy for what it gives in speed
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n, r in done.items():
            x, y = r["samples_per_s"] / ref["samples_per_s"], (r["test_acc"] - ref["test_acc"]) * 100
            ax.scatter(x, y, color="tab:red" if n.startswith("lp") else "tab:gray")
            ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="k", lw=0.5)
        ax.axhline(-1, color="k", lw=0.5, ls=":")
        ax.set_xlabel(f"speedup over {results['reference']}")
        ax.set_ylabel("test accuracy − serial backprop (points)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_speedup.png", dpi=120)
        plt.close(fig)
