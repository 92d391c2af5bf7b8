"""The speed model of docs/design.md §6: against a bench's measurement, and projected.

Both play the run's own timetable (timetable_model.py): a rank's step is its actions in
the order it runs them, and the waits, the fill and drain of an epoch and the traffic of
every micro-batch follow from the schedule. Only where the action costs come from differs:

* against a bench (`measured_vs_predicted`): each rank's stage, AuxNet and per-step
  overhead times as the run measured them, split over the forwards and backwards its
  timetable runs in a step; the world allreduce at the fastest rank's communication time;
  a message at its bytes over this machine's loopback (CPU_LINK_BPS). What is checked is
  how the ranks' work composes into a step, which is what the parallel method changes;
* the projection (`projection`): multiply-accumulates (MACs) per block and per AuxNet head at
  an assumed GPU rate (forward + backward = 3 x forward), plus a fixed cost per layer and
  pass that small micro-batches cannot hide (the small micro-batch efficiency); messages
  and the AuxNet allreduce (a ring) over a cluster link.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from hpcaux.bench.methods import method_overrides
from hpcaux.bench.spec import BenchSpec, load_bench
from hpcaux.bench.timetable_model import ActionCosts, actions_per_step, step_time
from hpcaux.config import load_config
from hpcaux.data.sets import image_size
from hpcaux.errors import UserError
from hpcaux.models import build_model
from hpcaux.models.auxnet import AuxNet
from hpcaux.models.partition import balanced_cuts, block_flops, block_inputs, count_macs
from hpcaux.train.lp.schedule import Plan, plan_of

REPO = Path(__file__).resolve().parents[2]
CPU_LINK_BPS = 2e9      # bytes/s of a gloo message between two ranks of this machine (loopback TCP)
# The projection's assumptions (no GPU has run hpcaux: none is calibrated on a measurement)
GPU_MACS_PER_S = 5e12   # sustained rate of one data-centre GPU (about half an A100's FP32 peak)
LAYER_PASS_S = 10e-6    # a layer's kernel launch and host overhead per pass, whatever the micro-batch
BANDWIDTH_BPS = 25e9    # bytes/s: an InfiniBand HDR / NVLink-between-nodes class link
LATENCY_S = 5e-6
AUX_CALIBRATION = "cifar10_resnet20_k2"   # docs/bench/<this>: the AuxNet's measured time per MAC
PROJECTED = (("resnet56", 10, 32, 128, 390), ("resnet110", 10, 32, 128, 390), ("wrn28_10", 10, 32, 128, 390),
             ("resnet50", 1000, 224, 64, 20018))   # model, classes, image, batch, steps an epoch
KS = (2, 4, 8, 16)
PROJECTED_MICROBATCHES = 4


def bench_spec(results: dict) -> BenchSpec | None:
    """The bench file a results file's command names, at the K it ran (None where that
    file is gone)."""
    found = re.search(r"--config (\S+)", results["command"])
    if not found:
        return None
    path = Path(found.group(1))
    path = path if path.is_file() else REPO / path
    if not path.is_file():
        return None
    spec = load_bench(path)
    spec.K = results["K"]
    return spec


def method_config(spec: BenchSpec, results: dict, name: str):
    """The config a bench row ran, from its bench file and the bench's overrides (None
    where that file no longer lists the method, or the method used a setting since
    retired)."""
    try:
        method = spec.method(name)
    except KeyError:
        return None
    if method.retired:
        return None
    try:
        return load_config(spec.base, results["overrides"] + method_overrides(
            method, spec.K, results["batch_size"], results["epochs"], spec.finetune_epochs, spec.backend))
    except UserError:
        return None


def _boundary_values(cfg, cuts: list[int] | None) -> list[int]:
    """Values of one sample's activation at each boundary of the run's cut (the run's own,
    else the config's, else balanced by MACs as the oldest benches cut)."""
    size = image_size(cfg.data)
    model = build_model(cfg.model.arch, 10).eval()
    sample = torch.zeros(1, 3, size, size)
    cuts = cuts or cfg.parallel.cuts or balanced_cuts(block_flops(model, sample), cfg.parallel.K)
    inputs = block_inputs(model, sample)
    return [inputs[c][0].numel() for c in cuts]


def _split(total: float, forwards: float, backwards: float) -> tuple[float, float]:
    """A per-step time split over its forwards and backwards, a backward costing two forwards."""
    units = forwards + 2 * backwards
    return (total / units, 2 * total / units) if units else (0.0, 0.0)


def measured_costs(plan: Plan, rec: dict, values: list[int], batch: int) -> ActionCosts:
    """A bench row's per-rank times as the cost of each action of its timetable."""
    K, micro = plan.K, batch // plan.microbatches
    stage, aux = [], []   # per rank: (forward, backward) of the stage, of the AuxNet
    for k in range(K):
        n = actions_per_step(plan, k)
        stage.append(_split(rec["stage_ms_per_rank"][k], n["forward"], n["backward"]))
        aux.append(_split(rec["aux_ms_per_rank"][k], n["aux_forward"], n["aux_backward"]))
    (fwd, bwd), (aux_f, aux_b) = zip(*stage), zip(*aux)
    comm = rec["comm_ms_per_rank"]
    overhead = [max(0.0, step - stage - aux - c) for step, stage, aux, c in
                zip(rec["step_ms_per_rank"], rec["stage_ms_per_rank"], rec["aux_ms_per_rank"], comm)]
    messages = [4 * v * micro / CPU_LINK_BPS * 1e3 for v in values]
    return ActionCosts(fwd, bwd, aux_f, aux_b, tuple(messages), min(comm), tuple(overhead))


def measured_vs_predicted(results: dict) -> list[dict]:
    """For each layer-parallel row of a bench without a fine-tune: the step time its
    timetable gives from the row's own per-rank times, against the measured one."""
    rows, spec = [], bench_spec(results)
    for name, rec in results["methods"].items():
        if "error" in rec or rec.get("ranks", 1) < 2 or not rec.get("stage_ms_per_rank") or rec.get("finetune_s"):
            continue
        cfg = method_config(spec, results, name) if spec else None
        if cfg is None or cfg.method != "layer_parallel":
            continue
        steps = (results["train_subset"] or 50000) // results["batch_size"]
        plan = plan_of(cfg, results["K"], steps)
        predicted = step_time(plan, measured_costs(plan, rec, _boundary_values(cfg, rec.get("cuts")),
                                                   results["batch_size"]))
        stages, comm = rec["stage_ms_per_rank"], rec["comm_ms_per_rank"]
        rows.append({"method": name, "timetable": plan.path, "microbatches": plan.microbatches, "stage_ms": stages,
                     "predicted_step_ms": predicted.step_ms, "measured_step_ms": rec["step_ms"],
                     "error": predicted.step_ms / rec["step_ms"] - 1, "fill_drain_ms": predicted.fill_drain_ms,
                     "predicted_wait_ms": predicted.wait_ms, "measured_wait_ms": [c - min(comm) for c in comm],
                     "imbalance_timed": rec.get("cut_imbalance"),
                     "imbalance_trained": stage_imbalance(stages)})
    return rows


def stage_imbalance(stages: list[float]) -> float:
    """The slowest stage over the mean stage, minus one."""
    return max(stages) / (sum(stages) / len(stages)) - 1


def aux_scale(results: dict, width: int, depth: int) -> float:
    """The AuxNet's measured time per MAC over the stages' in a bench (its upsampling heads
    do little arithmetic per byte): the measured AuxNet/stage time ratio over the one the
    MAC count predicts for the same model, width, depth and K (1 without a measurement)."""
    measured = [r["aux_fraction_of_stage"] for r in results["methods"].values()
                if r.get("aux_fraction_of_stage") is not None]
    if not measured:
        return 1.0
    cfg = load_config(REPO / "configs" / Path(results["base"]).name, results["overrides"])
    model = ProjectedModel(cfg.model.arch, 10, image_size(cfg.data), results["batch_size"], width, depth)
    costs = model.costs(results["K"], 1, 1e12, 0.0, 0.0, with_aux=True)
    stage = max(f + b for f, b in zip(costs.forward_ms, costs.backward_ms))
    predicted = max(f + b for f, b in zip(costs.aux_forward_ms, costs.aux_backward_ms)) / stage
    return max(1.0, min(measured) / predicted)


class ProjectedModel:
    """A model's blocks, boundaries and AuxNet counted once, costed at any K and M."""

    def __init__(self, arch: str, classes: int, size: int, batch: int, aux_width: int, aux_depth: int):
        self.size, self.batch, self.aux_width, self.aux_depth = size, batch, aux_width, aux_depth
        # eval mode: a one-image count must not trip BatchNorm at a 1x1 feature map
        self.model = build_model(arch, classes).eval()
        sample = torch.zeros(1, 3, size, size)
        self.blocks = block_flops(self.model, sample)
        self.inputs = [tuple(x.shape[1:]) for x in block_inputs(self.model, sample)]   # a cut before block c sends these
        self.layers = [_leaves(block) for block in self.model]

    def serial_ms(self, rate: float, layer_s: float) -> float:
        return 3 * (sum(self.blocks) * self.batch / rate + sum(self.layers) * layer_s) * 1e3

    def costs(self, K: int, microbatches: int, rate: float, layer_s: float, link_s_per_byte: float,
              with_aux: bool, aux_time_scale: float = 1.0) -> ActionCosts:
        """Every action's time at K stages cut at balanced MACs and micro-batches of batch/M;
        the AuxNet's compute times `aux_time_scale`."""
        micro = self.batch // microbatches
        edges = [0, *balanced_cuts(self.blocks, K), len(self.blocks)]
        fwd = [(sum(self.blocks[a:b]) * micro / rate + sum(self.layers[a:b]) * layer_s) * 1e3
               for a, b in zip(edges, edges[1:])]
        shapes = [self.inputs[c] for c in edges[1:-1]]
        messages = [(LATENCY_S + 4 * torch.Size(s).numel() * micro * link_s_per_byte) * 1e3 for s in shapes]
        aux_ms, values = [0.0] * K, 0
        if with_aux:
            aux = AuxNet(shapes, self.aux_width, self.aux_depth, 3, self.size).eval()
            x = torch.zeros(1, 3, self.size, self.size)
            aux_ms = []
            for k in range(K):   # a rank runs the trunk and the heads of its input and its target
                heads = [b for b in (k - 1, k) if 0 <= b < K - 1]
                macs = count_macs(aux, lambda: aux(x, heads))
                layers = _leaves(aux.trunk) + sum(_leaves(aux.heads[b]) for b in heads)
                aux_ms.append((macs * micro / rate * aux_time_scale + layers * layer_s) * 1e3)
            values = sum(p.numel() for p in aux.parameters()) + sum(b.numel() for b in aux.buffers()
                                                                   if b.is_floating_point())
        ring = 2 * (K - 1) * LATENCY_S + 2 * (K - 1) / K * 4 * values * link_s_per_byte
        return ActionCosts(tuple(fwd), tuple(2 * f for f in fwd), tuple(aux_ms), tuple(2 * a for a in aux_ms),
                           tuple(messages), ring * 1e3, (0.0,) * K)


def _leaves(module: torch.nn.Module) -> int:
    """Layers without sublayers: what launches a kernel (or a few) per pass."""
    return sum(1 for m in module.modules() if not list(m.children()))


# The projected methods, each as the shipped config that runs it (GPipe: the fine-tune's
# schedule, what torch.distributed.pipelining gives a user); K is the projection's.
PROJECTED_METHODS = {"gpipe": None, "pipeline": "cifar10_resnet20_k2.yaml", "auxnet": "cifar10_resnet20_auxnet.yaml",
                     "relay": "cifar10_resnet20_relay_k4.yaml"}


def _plan(method: str, K: int, steps: int) -> Plan:
    if PROJECTED_METHODS[method] is None:
        return Plan("gpipe", K, steps, PROJECTED_MICROBATCHES)
    return plan_of(load_config(REPO / "configs" / PROJECTED_METHODS[method]), K, steps)


def projection(ks=KS, models=PROJECTED) -> dict:
    """The one GPU projection every report shows: step time and speedup over serial
    backprop on one GPU, per model and K, of each projected method; the AuxNet sized as
    the shipped AuxNet config and its time per MAC calibrated on AUX_CALIBRATION."""
    aux_cfg = load_config(REPO / "configs" / PROJECTED_METHODS["auxnet"]).auxnet
    calibration = json.loads((REPO / "docs" / "bench" / AUX_CALIBRATION / "results.json").read_text())
    scale = aux_scale(calibration, aux_cfg.width, aux_cfg.depth)
    rows = []
    for arch, classes, size, batch, steps in models:
        model = ProjectedModel(arch, classes, size, batch, aux_cfg.width, aux_cfg.depth)
        serial = model.serial_ms(GPU_MACS_PER_S, LAYER_PASS_S)
        for K in ks:
            if K > len(model.blocks):
                continue
            row, cached = {"model": arch, "image": size, "batch": batch, "K": K, "serial_ms": serial}, {}
            for name in PROJECTED_METHODS:
                plan = _plan(name, K, steps)
                with_aux = plan.path in ("auxnet", "exchange")
                key = (plan.microbatches, with_aux)
                if key not in cached:
                    cached[key] = model.costs(K, plan.microbatches, GPU_MACS_PER_S, LAYER_PASS_S,
                                              1 / BANDWIDTH_BPS, with_aux, scale)
                step = step_time(plan, cached[key]).step_ms
                row[name] = {"microbatches": plan.microbatches, "step_ms": step, "speedup": serial / step}
            rows.append(row)
    return {"assumptions": {"macs_per_s": GPU_MACS_PER_S, "layer_pass_s": LAYER_PASS_S, "link_bps": BANDWIDTH_BPS,
                            "latency_s": LATENCY_S, "aux_time_per_mac": scale, "aux_calibration": AUX_CALIBRATION,
                            "auxnet_width": aux_cfg.width, "auxnet_depth": aux_cfg.depth},
            "rows": rows}
