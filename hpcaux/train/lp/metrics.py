"""Held-out measurements of a layer-parallel run, every epoch and at the end (docs/design.md §1):
the composed network's accuracy (the network a user gets), and in AuxNet mode the
AuxNet-path accuracy F_K(A_{K-1}(x)) and the relative gap per boundary. Plus, on the fixed
probe images, the composed network's activation at every boundary and (with an AuxNet) the
AuxNet's prediction of it, which the store snapshots every epoch.
"""
from __future__ import annotations

import torch

from hpcaux.comm import Comm
from hpcaux.config import Config
from hpcaux.data.sets import TrainingData
from hpcaux.train.lp.composed import StageChain
from hpcaux.train.lp.losses import relative_gap
from hpcaux.train.lp.step import LayerParallelStep
from hpcaux.train.run.layout import Layout


class HeldOutMetrics:
    def __init__(self, step: LayerParallelStep, chain: StageChain, comm: Comm, data: TrainingData, cfg: Config,
                 layout: Layout, device: torch.device):
        """`step` is the rank's LayerParallelStep (modules and inputs), `chain` its StageChain."""
        self.step, self.chain, self.comm, self.data = step, chain, comm, data
        self.cfg, self.layout, self.device = cfg, layout, device

    def eval_batches(self, split: str, subset: int):
        """This replica's shard of held-out split `split`: the replicas' counts add up to it once."""
        return self.data.heldout_batches(split, self.cfg.train.eval_batch_size, device=self.device,
                                         subset=subset, seed=self.cfg.seed, shard=self.layout.replica,
                                         shards=self.layout.D)

    @torch.no_grad()
    def __call__(self, subset: int, split: str | None = None) -> dict:
        """The measurements on `subset` images of `split` (default: the per-epoch split,
        validation where the run has one; the run's end passes "test")."""
        split = split or self.data.monitor_split
        K = self.layout.K
        correct, total = self.chain.correct_count(self.eval_batches(split, subset))
        counts = {"composed": torch.tensor([correct, total], dtype=torch.float64),
                  "auxnet_path": torch.zeros(2, dtype=torch.float64),
                  "gap": torch.zeros(K - 1, 2, dtype=torch.float64)}  # per boundary: sum ||F-A||², sum ||A||²
        if self.step.auxnet is not None:
            self._auxnet_counts(split, subset, counts)
        self.comm.allreduce(list(counts.values()), op="sum", what="allreduce held-out metrics")
        result = {"composed_acc": (counts["composed"][0] / counts["composed"][1]).item()}
        if self.step.auxnet is not None:
            result["auxnet_path_acc"] = (counts["auxnet_path"][0] / counts["auxnet_path"][1]).item()
            result["rel_gap"] = (counts["gap"][:, 0] / counts["gap"][:, 1]).tolist()
        return result

    def _auxnet_counts(self, split: str, subset: int, counts: dict):
        """This rank's share: the gap of its output boundary, or (last stage) the AuxNet path."""
        step = self.step
        modules = [m for m in (step.auxnet, step.stage, step.local_head) if m is not None]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        for x, y in self.eval_batches(split, subset):
            with step.precision.float32():  # evaluation in float32, whatever train.precision says
                inp, target, _ = step.inputs(x, None)
                out = step.stage(inp)
            if target is not None:
                counts["gap"][step.out_boundary] += torch.stack(relative_gap(out, target)).double().cpu()
            else:
                counts["auxnet_path"] += torch.tensor([(out.argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
        for m, mode in zip(modules, modes):
            m.train(mode)

    @torch.no_grad()
    def probe_outputs(self) -> dict:
        """On the fixed probe images, for the boundary this rank's stage ends at (replica 0;
        the others return nothing): {"real": {b: the composed network's activation}, and
        with an AuxNet "auxnet": {b: its head's prediction}}, both in evaluation mode. The
        real one goes along replica 0's chain, so every stage of it must call this."""
        step, probe_size = self.step, self.cfg.store.probe_size
        if self.layout.replica != 0 or not probe_size:
            return {}
        probe = next(self.data.heldout_batches(self.data.monitor_split, probe_size, device=self.device,
                                               subset=probe_size, seed=self.cfg.seed))[0]
        was_training = step.stage.training
        step.stage.eval()
        _, real = self.chain.forward(probe)
        step.stage.train(was_training)
        if step.out_boundary is None:
            return {}
        outputs = {"real": {step.out_boundary: real.cpu().numpy()}}
        if step.auxnet is not None:
            step.auxnet.eval()
            outputs["auxnet"] = {b: v.cpu().numpy() for b, v in step.auxnet(probe, [step.out_boundary]).items()}
            step.auxnet.train()
        return outputs
