"""BENCH/results.md and the plots, from BENCH/results.json."""
from __future__ import annotations

from pathlib import Path

from hpcaux.bench.cost_model import BANDWIDTH_BPS, LATENCY_S, measured_vs_predicted


def _ms(values) -> str:
    return "/".join(f"{v:.0f}" for v in values) if values else "–"


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
        reused = " (reused: ran before this invocation)" if rec.get("reused") else ""
        lines.append(
            f"| {i}. {rec['label']}{reused} | {rec['ranks']} × {rec['threads']} | {rec['samples_per_s']:.0f} | "
            f"{speedup:.2f}× | {rec['step_ms']:.0f} | {_ms(rec['stage_ms_per_rank'])} | {_ms(rec['aux_ms_per_rank'])} | "
            f"{_ms(rec['comm_ms_per_rank'])} | {_ms(rec['idle_ms_per_rank'])} | {_ms(rec['peak_mem_mb_per_rank'])} | "
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
    rows = measured_vs_predicted(results)
    if not rows:
        return "(no layer-parallel method finished)"
    lines = ["| method | T_serial ms | T_stage ms (ideal T/K) | T_aux ms | T_comm ms | predicted (equal stages) | "
             "predicted (measured stages) | measured | imbalance ms | contention ms | cuts | imbalance timed / trained |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        timed = f"{100 * r['imbalance_timed']:.1f} %" if r.get("imbalance_timed") is not None else "–"
        lines.append(f"| {r['method']} | {r['T_serial_ms']:.0f} | {_ms(r['T_stage_ms'])} ({r['ideal_stage_ms']:.0f}) | "
                     f"{r['T_aux_ms']:.0f} | {r['T_comm_ms']:.0f} | {r['predicted_equal_stages']:.2f}× | "
                     f"{r['predicted_measured_stages']:.2f}× | {r['measured']:.2f}× | {r['imbalance_ms']:.0f} | "
                     f"{r['contention_ms']:.0f} | {r.get('cuts') or '–'} | "
                     f"{timed} / {100 * r['imbalance_trained']:.1f} % |")
    return "\n".join(lines)


def projection_table(rows: list[dict]) -> str:
    lines = ["| model | image | batch | K | T_serial ms | T_stage ms | T_aux ms | T_comm ms | allreduce MB | "
             "projected speedup |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['image']} | {r['batch']} | {r['K']} | {r['T_serial_ms']:.1f} | "
                     f"{r['T_stage_ms']:.1f} | {r['T_aux_ms']:.2f} | {r['T_comm_ms']:.3f} | {r['allreduce_MB']:.2f} | "
                     f"{r['speedup']:.2f}× (of {r['ideal']}) |")
    return "\n".join(lines)


def projection_header(rate: float, aux_scale: float) -> str:
    return (f"Compute at {rate / 1e12:.1f} TMAC/s (forward + backward = 3 × forward MACs); AuxNet time × "
            f"{aux_scale:.1f} (its measured time per MAC relative to the stages, see below); ring allreduce at "
            f"{BANDWIDTH_BPS / 1e9:.0f} GB/s and {LATENCY_S * 1e6:.0f} µs per message.")


def write_report(results: dict, out: Path, projections: dict | None = None) -> Path:
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
            "Imbalance = slowest stage over the mean stage: timed = what the cut's timing measured side by side "
            "before training (docs/design.md §6), trained = the stage times of the run.", "",
            model_table(results), ""]
    if projections:
        text += ["## Projection", "", projection_header(projections["rate"], projections["aux_scale"]), "",
                 projection_table(projections["rows"]), ""]
    text += ["![samples per second](throughput.png)", "", "![accuracy against training time](accuracy_vs_time.png)", "",
             "![accuracy against speedup](accuracy_vs_speedup.png)", ""]
    path = out / "results.md"
    path.write_text("\n".join(text))
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
