"""What a layer-parallel run logs: one record per epoch (metrics.jsonl, the store's series)
and the run's summary (summary.json), built from named per-rank values gathered in one
allreduce each (`Comm.gather_per_rank`).

Per-boundary values come from the boundary's owner (stage k of replica 0: the world's
first K-1 ranks); per-stage values from replica 0; times from every rank.
"""
from __future__ import annotations

import torch

from hpcaux.comm import Comm
from hpcaux.config import Config
from hpcaux.data.sets import heldout_summary
from hpcaux.train.loop import EpochTotals
from hpcaux.train.lp.step import LayerParallelStep
from hpcaux.train.run.layout import Layout

TIMERS = ("aux_s", "stage_s", "comm_s", "step_s")


def _ms(column: torch.Tensor) -> list[float]:
    return (column * 1e3).tolist()


def layer_parallel_record(epoch: int, rho: float, totals: EpochTotals, step: LayerParallelStep, comm: Comm,
                          cfg: Config, layout: Layout, metrics: dict, samples: int) -> dict:
    """The record of a layer-parallel epoch (`samples` trained on per epoch, all replicas)."""
    stats = step.epoch_stats
    ranks = comm.gather_per_rank({
        "loss": totals.mean("loss"), "train_gap": totals.sums["gap_num"] / max(totals.sums["gap_den"], 1e-12),
        **{k: totals.mean(k) for k in TIMERS}, "input_ms": totals.input_ms,
        "multiplier_rms": stats["multiplier"].rms(), "z_mean": stats["z"].mean(), "z_std": stats["z"].std()})
    owners = slice(0, layout.K - 1)

    def per_boundary(name, wanted=True):
        return ranks[name][owners].tolist() if wanted else None

    stored, auxless = cfg.lp.aux_source == "stored", cfg.lp.aux_source == "none"
    return {"epoch": epoch + 1, "phase": "layer_parallel", "rho": rho, "lr": totals.lr,
            "stage_loss": ranks["loss"][:layout.K].tolist(), "train_rel_gap": per_boundary("train_gap", not auxless),
            **metrics,
            "step_ms": _ms(ranks["step_s"]), "aux_ms": _ms(ranks["aux_s"]), "comm_ms": _ms(ranks["comm_s"]),
            "input_ms": ranks["input_ms"].tolist(),
            "multiplier_rms": per_boundary("multiplier_rms", cfg.lp.loss != "penalty"),
            "z_mean": per_boundary("z_mean", stored), "z_std": per_boundary("z_std", stored),
            "allreduce_values": step.allreduce_values,
            "samples_per_s": samples / totals.seconds, "epoch_s": totals.seconds}


def finetune_record(epoch: int, totals: EpochTotals, comm: Comm, layout: Layout, metrics: dict, samples: int) -> dict:
    """The record of a fine-tune epoch: the loss is the last stage's (it holds the labels)."""
    ranks = comm.gather_per_rank({"loss": totals.mean("loss")})
    return {"epoch": epoch + 1, "phase": "finetune", "lr": totals.lr,
            "stage_loss": [0.0] * (layout.K - 1) + [ranks["loss"][layout.K - 1].item()], **metrics,
            "step_ms": [totals.seconds / max(totals.steps, 1) * 1e3] * comm.size,
            "samples_per_s": samples / totals.seconds, "epoch_s": totals.seconds}


def epoch_line(r: dict) -> str:
    """The line printed after every epoch."""
    gaps = " ".join(f"{g:.4f}" for g in r.get("rel_gap", r.get("train_rel_gap") or []))
    gaps = f" gap {gaps}" if gaps else ""  # no AuxNet, no gap
    aux = f" auxnet-path {r['auxnet_path_acc']:.3f}" if "auxnet_path_acc" in r else ""
    steps = "/".join(f"{t:.0f}" for t in r["step_ms"])
    return (f"epoch {r['epoch']} [{r['phase']}]: loss {'/'.join(f'{v:.3f}' for v in r['stage_loss'])} "
            f"composed {r['composed_acc']:.3f}{aux}{gaps} rho {r.get('rho', 0):.2f} "
            f"step ms {steps} ({r['samples_per_s']:.0f} samples/s)")


def run_summary(trainer, final: dict, timers: dict, steps_done: int, times: dict, peak_mem_mb: float) -> dict:
    """summary.json: the final held-out metrics, the throughput and the per-rank step split.

    `timers` are the layer-parallel steps' summed times (TIMERS), `times` the run's
    wall, layer-parallel and fine-tune seconds."""
    cfg, lay, comm = trainer.cfg, trainer.layout, trainer.comm
    ranks = comm.gather_per_rank({**{k: timers.get(k, 0.0) / max(steps_done, 1) for k in TIMERS},
                                  "peak_mem_mb": peak_mem_mb, "host_trips": comm.host_trips})
    train_s = times["train_s"]
    return {"method": "layer_parallel", "model": cfg.model.arch, "dataset": cfg.data.dataset,
            "K": lay.K, "D": lay.D, **trainer.parts.partition.summary(), "loss": cfg.lp.loss, "aux_source": cfg.lp.aux_source,
            "epochs": cfg.train.epochs, "finetune_epochs": cfg.train.finetune_epochs, "train_samples": trainer.data.n_train,
            **heldout_summary(trainer.data, cfg.data),
            "test_acc": final["composed_acc"], "auxnet_path_acc": final.get("auxnet_path_acc"),
            "final_rel_gap": final.get("rel_gap"), **times,
            "train_samples_per_s": steps_done * cfg.train.batch_size * lay.D / train_s if train_s else None,
            "step_ms_per_rank": _ms(ranks["step_s"]), "aux_ms_per_rank": _ms(ranks["aux_s"]),
            "stage_ms_per_rank": _ms(ranks["stage_s"]), "comm_ms_per_rank": _ms(ranks["comm_s"]),
            "aux_fraction_of_stage": (ranks["aux_s"] / ranks["stage_s"].clamp(min=1e-12)).max().item(),
            "peak_mem_mb_per_rank": ranks["peak_mem_mb"].tolist(),
            "allreduce_values_per_step": trainer.step.allreduce_values,
            "threads": torch.get_num_threads(), "backend": comm.name, "transport": comm.transport,
            "host_trips_per_rank": [int(n) for n in ranks["host_trips"]], "store_mode": trainer.store.mode,
            **trainer.step.precision.summary(),
            "device": str(trainer.device), "placement": lay.placement(trainer.hosts)}
