"""A rank's place and share of the layer-parallel network (docs/design.md §1): its stage, local
classifier, AuxNet replica and their optimisers, with the cut they come from. The
trainer builds them once (`build_stage_parts`); the checkpoint saves and restores them
(`state`, `load`) and the records read them, so none of those needs the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hpcaux.comm import Comm
from hpcaux.config import Config
from hpcaux.config_rules import check_layer_parallel_world
from hpcaux.data.sets import cut_timing_sample
from hpcaux.errors import UserError
from hpcaux.models import block_count, build_model
from hpcaux.models.partition import boundary_shapes, check_stage_count, make_stages
from hpcaux.store.aux_store import store_mode
from hpcaux.store.checkpoint import load_file
from hpcaux.train.lp.exchange import graphs_in_flight
from hpcaux.train.lp.modules import build_auxnet, build_local_head
from hpcaux.train.run.balance import Partition, agree_on_partition
from hpcaux.train.run.layout import Layout
from hpcaux.train.run.optim import make_optimizer
from hpcaux.train.run.precision import Precision
from hpcaux.train.run.runtime import seed_everything


def checked_layout(cfg: Config, comm: Comm) -> Layout:
    """This rank's place in K stages x D replicas, after the checks that depend on it
    (K against the model first: the world size follows from K)."""
    K = cfg.parallel.K
    if K < 2:
        raise UserError("config key 'parallel.K' must be >= 2 for method: layer_parallel")
    check_stage_count(K, block_count(cfg.model.arch))
    lay = Layout.for_world(K, cfg.parallel.D, comm.rank, comm.size)
    check_layer_parallel_world(cfg, lay.D, store_mode(cfg.store.mode))
    return lay


@dataclass
class StageParts:
    layout: Layout
    partition: Partition                    # the cut, and the stage times it was chosen on
    shapes: list[tuple]                     # every boundary's activation shape (one sample)
    stage: torch.nn.Module
    local_head: torch.nn.Module | None      # a non-last stage's local classifier
    auxnet: torch.nn.Module | None          # this rank's AuxNet replica (lp.aux_source auxnet)
    stage_opt: torch.optim.Optimizer        # the stage's and its local head's parameters
    aux_opt: torch.optim.Optimizer | None

    @property
    def cuts(self) -> list[int]:
        return self.partition.cuts

    def state(self) -> dict[str, dict]:
        """The checkpoint files this rank writes: its stage's (replica 0 only: the replicas
        are identical) and the AuxNet's (rank 0 of stage 0)."""
        lay, files = self.layout, {}
        if lay.replica == 0:
            files[f"stage_{lay.stage}.pt"] = {
                "stage": self.stage.state_dict(),
                "local_head": self.local_head.state_dict() if self.local_head else None,
                "stage_opt": self.stage_opt.state_dict()}
            if lay.stage == 0 and self.auxnet is not None:
                files["auxnet.pt"] = {"auxnet": self.auxnet.state_dict(), "aux_opt": self.aux_opt.state_dict()}
        return files

    def load(self, folder: Path, device: torch.device):
        """This rank's stage (and the AuxNet) from a checkpoint folder; a file that does
        not fit the model is one UserError naming the folder."""
        state = load_file(folder / f"stage_{self.layout.stage}.pt", device)
        try:
            self.stage.load_state_dict(state["stage"])
            if self.local_head is not None:
                self.local_head.load_state_dict(state["local_head"])
            self.stage_opt.load_state_dict(state["stage_opt"])
            if self.auxnet is not None:
                aux = load_file(folder / "auxnet.pt", device)
                self.auxnet.load_state_dict(aux["auxnet"])
                self.aux_opt.load_state_dict(aux["aux_opt"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise UserError(f"checkpoint {folder} does not fit this run's model ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:120]})") from None


def build_stage_parts(cfg: Config, comm, layout: Layout, data, device: torch.device, precision: Precision,
                      cuts: list[int] | None = None) -> tuple[StageParts, list]:
    """The rank's parts, at the same initial weights on every rank, cut where the ranks
    agree (`cuts`: a resume's; otherwise timed side by side, with the graphs the stage
    will keep in flight); also every stage's view, which the stored z's start needs."""
    K, s = layout.K, layout.stage
    seed_everything(cfg.seed)
    model = build_model(cfg.model.arch, data.num_classes).to(device)
    precision.prepare(model)  # the cut is timed in the run's memory format
    in_flight = graphs_in_flight(K, s, cfg.lp.aux_source == "none", cfg.lp.delayed_grad) if cfg.lp.exchanges else 0
    partition = agree_on_partition(
        cfg.parallel, comm, model, cut_timing_sample(data, device, cfg.train.batch_size // cfg.parallel.microbatches),
        s, precision.forward, cfg.lp.boundary_norm, cuts=cuts, in_flight=in_flight)
    stages = make_stages(model, partition.cuts, boundary_norm=cfg.lp.boundary_norm)
    shapes = boundary_shapes(stages, data.image_shape, device)
    local_head = build_local_head(cfg, shapes, s, data.num_classes).to(device) \
        if s < K - 1 and cfg.lp.local_cls_weight > 0 else None
    auxnet = build_auxnet(cfg, shapes, data.image_shape).to(device) if cfg.lp.aux_source == "auxnet" else None
    precision.prepare(local_head, auxnet)
    stage_params = list(stages[s].parameters()) + (list(local_head.parameters()) if local_head else [])
    parts = StageParts(layout, partition, shapes, stages[s], local_head, auxnet, make_optimizer(stage_params, cfg.optim),
                       make_optimizer(auxnet.parameters(), cfg.optim) if auxnet else None)
    return parts, stages
