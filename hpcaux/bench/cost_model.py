"""The speed model of docs/design.md §6, measured and projected.

    speedup(K) = T_serial / (T_aux + max_k T_stage_k + T_comm)

with T_serial = T_f + T_b of the whole network. With equal stages max_k T_stage_k is
T_serial / K, which gives docs/design.md's formula; measured stages are not equal (the cut
is made of whole blocks) and on a shared CPU each stage also runs slower than its share
of the serial step (memory bandwidth), so the bench reports both effects.

Projections count multiply-accumulates (MACs) per block and per AuxNet head, turn them
into time at a stated compute rate (forward + backward = 3 x forward), and model the
AuxNet allreduce as a ring: 2 (K-1)/K bytes / bandwidth + 2 (K-1) latency.
"""
from __future__ import annotations

import torch

from hpcaux.models import build_model
from hpcaux.models.auxnet import AuxNet
from hpcaux.models.partition import balanced_cuts, block_flops, boundary_shapes, count_macs, make_stages

PROJECTED = (("resnet56", 10, 32, 128), ("resnet110", 10, 32, 128), ("wrn28_10", 10, 32, 128),
             ("resnet50", 1000, 224, 64))
KS = (2, 4, 8, 16)
BANDWIDTH_BPS = 25e9   # bytes/s: an InfiniBand HDR / NVLink-between-nodes class link
LATENCY_S = 5e-6
GPU_MACS_PER_S = 5e12  # assumed sustained rate of one data-centre GPU (about half an A100's FP32 peak)


def predicted_speedup(t_serial: float, t_stage_max: float, t_aux: float, t_comm: float) -> float:
    return t_serial / (t_aux + t_stage_max + t_comm)


def measured_vs_predicted(results: dict) -> list[dict]:
    """For each layer-parallel method of a bench: the terms, the prediction, the measurement."""
    ref = results["methods"][results["reference"]]
    K, rows = results["K"], []
    for name, rec in results["methods"].items():
        if "error" in rec or not rec.get("aux_ms_per_rank") or "error" in ref:
            continue
        t_serial = ref["step_ms"]
        t_aux, t_comm = max(rec["aux_ms_per_rank"]), min(rec["comm_ms_per_rank"])
        stages = rec["stage_ms_per_rank"]
        rows.append({"method": name, "T_serial_ms": t_serial, "T_aux_ms": t_aux, "T_comm_ms": t_comm,
                     "T_stage_ms": stages, "ideal_stage_ms": t_serial / K,
                     "predicted_equal_stages": predicted_speedup(t_serial, t_serial / K, t_aux, t_comm),
                     "predicted_measured_stages": predicted_speedup(t_serial, max(stages), t_aux, t_comm),
                     "measured": rec["samples_per_s"] / ref["samples_per_s"],
                     "imbalance_ms": max(stages) - sum(stages) / len(stages),
                     "imbalance_trained": max(stages) / (sum(stages) / len(stages)) - 1,
                     "cuts": rec.get("cuts"), "imbalance_timed": rec.get("cut_imbalance"),
                     "contention_ms": sum(stages) / len(stages) - t_serial / K})
    return rows


def aux_scale_from_bench(results: dict, aux_width: int, aux_depth: int, arch: str, classes: int = 10,
                         size: int = 32) -> float:
    """Measured AuxNet/stage time ratio of the bench's layer-parallel runs over the ratio
    the MAC count predicts for the same model and K (1 when there is no measurement)."""
    measured = [r["aux_fraction_of_stage"] for r in results["methods"].values()
                if r.get("aux_fraction_of_stage") is not None]
    if not measured:
        return 1.0
    row = project(aux_width, aux_depth, 1e12, ks=(results["K"],), models=((arch, classes, size, results["batch_size"]),))
    return max(1.0, min(measured) / row[0]["aux_fraction"]) if row else 1.0


def project(aux_width: int, aux_depth: int, rate: float, aux_scale: float = 1.0, ks=KS,
            models=PROJECTED) -> list[dict]:
    """Projected speedup of layer-parallel over serial for each model and K at `rate` MAC/s.

    `aux_scale` multiplies the AuxNet's MAC-derived time: its upsampling heads do little
    arithmetic per byte, so it runs slower per MAC than the stages (aux_scale_from_bench)."""
    rows = []
    for arch, classes, size, batch in models:
        # eval mode: a one-image count must not trip BatchNorm at a 1x1 feature map
        model = build_model(arch, classes).eval()
        blocks = block_flops(model, torch.zeros(1, 3, size, size))
        t_serial = 3 * sum(blocks) * batch / rate
        for K in ks:
            if K > len(blocks):
                continue
            cuts = balanced_cuts(blocks, K)
            edges = [0, *cuts, len(blocks)]
            stage_macs = [sum(blocks[a:b]) for a, b in zip(edges, edges[1:])]
            shapes = boundary_shapes(make_stages(model, cuts, boundary_norm=False), (3, size, size))
            aux = AuxNet(shapes, aux_width, aux_depth, 3, size).eval()
            x = torch.zeros(1, 3, size, size)
            # the costliest rank runs the trunk and two heads (its input and its target)
            aux_macs = max(count_macs(aux, lambda k=k: aux(x, [b for b in (k - 1, k) if 0 <= b < K - 1]))
                           for k in range(K))
            values = sum(p.numel() for p in aux.parameters()) + sum(b.numel() for b in aux.buffers()
                                                                   if b.is_floating_point())
            t_comm = 2 * (K - 1) / K * 4 * values / BANDWIDTH_BPS + 2 * (K - 1) * LATENCY_S
            t_aux = 3 * aux_macs * batch / rate * aux_scale
            t_stage = 3 * max(stage_macs) * batch / rate
            rows.append({"model": arch, "image": size, "batch": batch, "K": K, "T_serial_ms": t_serial * 1e3,
                         "T_stage_ms": t_stage * 1e3, "T_aux_ms": t_aux * 1e3, "T_comm_ms": t_comm * 1e3,
                         "aux_fraction": t_aux / t_stage, "allreduce_MB": 4 * values / 2**20,
                         "speedup": predicted_speedup(t_serial, t_stage, t_aux, t_comm), "ideal": K})
    return rows
