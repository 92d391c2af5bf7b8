"""Held-out measurements of a layer-parallel run, every epoch and at the end (docs/design.md §1):
the composed network's accuracy (the network a user gets), and in AuxNet mode the
AuxNet-path accuracy F_K(A_{K-1}(x)) and the relative gap per boundary. Plus, on the fixed
probe images, the composed network's activation at every boundary and (with an AuxNet) the
AuxNet's prediction of it, which the store snapshots every epoch.

Where stages trained on the AuxNet's predictions of their inputs, their BatchNorm
statistics are those of the predictions; before each measurement they are re-estimated
on the composed network's forward of a fixed draw of training images, and kept (so
checkpoints, `hpcaux reevaluate` and every metric below use the composed network's
statistics). Measured in docs/accuracy.md ("BatchNorm statistics of the composed network").
"""
from __future__ import annotations

import itertools

import torch

from hpcaux.comm import Comm
from hpcaux.config import Config
from hpcaux.data.sets import TrainingData
from hpcaux.train.lp.composed import StageChain
from hpcaux.train.lp.losses import relative_gap
from hpcaux.train.lp.step import LayerParallelStep
from hpcaux.train.run.layout import Layout


NORM_BATCHES = 10   # training batches the composed network's BatchNorm statistics are averaged over


def stages_train_on_predictions(cfg: Config) -> bool:
    """Whether stages train on the AuxNet's predictions of their inputs rather than on their
    predecessors' real outputs, so that their BatchNorm statistics are not the composed
    network's."""
    return cfg.lp.aux_source == "auxnet" and cfg.lp.real_inputs == "none"


class HeldOutMetrics:
    def __init__(self, step: LayerParallelStep, chain: StageChain, comm: Comm, data: TrainingData, cfg: Config,
                 layout: Layout, device: torch.device):
        """`step` is the rank's LayerParallelStep (modules and inputs), `chain` its StageChain."""
        self.step, self.chain, self.comm, self.data = step, chain, comm, data
        self.cfg, self.layout, self.device = cfg, layout, device
        self.reestimates_norms = stages_train_on_predictions(cfg)

    def eval_batches(self, split: str, subset: int):
        """This replica's shard of held-out split `split`: the replicas' counts add up to it once."""
        return self.data.heldout_batches(split, self.cfg.train.eval_batch_size, device=self.device,
                                         subset=subset, seed=self.cfg.seed, shard=self.layout.replica,
                                         shards=self.layout.D)

    def norm_batches(self):
        """The fixed training images the composed network's BatchNorm statistics come from:
        the first NORM_BATCHES batches of the seed's first epoch, augmented as in training
        (un-augmented statistics cost the pipeline 3.6 points, docs/accuracy.md), the same on
        every replica (so the replicas, and the checkpoint written from replica 0, agree)."""
        batches = self.data.train_batches(self.cfg.train.batch_size, seed=self.cfg.seed, epoch=0,
                                          augment=self.cfg.data.augment, device=self.device)
        return ((x, y) for x, y, _ in itertools.islice(batches, NORM_BATCHES))

    @torch.no_grad()
    def __call__(self, subset: int, split: str | None = None, *, composed_trained: bool = False) -> dict:
        """The measurements on `subset` images of `split` (default: the per-epoch split,
        validation where the run has one; the run's end passes "test"). After end-to-end
        training of the composed network (`composed_trained`, the fine-tune) its BatchNorm
        statistics are already its own and are not re-estimated."""
        split = split or self.data.monitor_split
        K = self.layout.K
        if self.reestimates_norms and not composed_trained:
            self.chain.reestimate_norm_statistics(self.norm_batches())
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
