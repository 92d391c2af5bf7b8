"""Where a layer-parallel epoch ends, and every checkpoint (docs/design.md §3): log the
epoch, record it in aux.h5, save when due. It takes the pieces it writes, not the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hpcaux.comm import Comm
from hpcaux.config import Config
from hpcaux.store.aux_store import AuxStore
from hpcaux.train.lp.checkpoint import save_run
from hpcaux.train.lp.parts import StageParts
from hpcaux.train.lp.records import epoch_line
from hpcaux.train.lp.store import RunStore
from hpcaux.train.run.rundir import discard_set_aside


@dataclass
class RunSaver:
    run_dir: Path
    comm: Comm
    cfg: Config
    parts: StageParts
    store: AuxStore
    run_store: RunStore
    probe_outputs: Callable[[], dict]   # the held-out metrics' probe snapshot of this epoch

    def end_of_epoch(self, epoch: int, record: dict, log, progress, last_epoch: int):
        """Log the epoch, record it in aux.h5, and checkpoint when due (all ranks).

        The run's last epoch is not saved here: the run saves it once, as `final`. Either
        way the store ends flushed, so its writes are visible to the other ranks."""
        if self.comm.rank == 0:
            log.append(record)
            progress.note(epoch_line(record))
        self.run_store.record_epoch(epoch - 1, record)
        if self.cfg.store.probe_size:
            self.run_store.record_snapshots(epoch, self.probe_outputs())
        every, run_ends = self.cfg.ckpt.every, epoch == self.cfg.train.epochs + self.cfg.train.finetune_epochs
        if not run_ends and (epoch == last_epoch or (every > 0 and epoch % every == 0)):
            self.save(f"epoch_{epoch}", epoch, record["phase"])
        else:
            self.store.flush(self.comm.barrier)

    def settle_and_save(self, step, tag: str, epoch: int, step_in_epoch: int):
        """A stop in a layer-parallel epoch: settle the step's neighbour exchange, then save
        it with the rest, so the resume continues it where it stopped (at an epoch's start
        nothing is in flight)."""
        exchange = step.exchange.settle(step.real_input_gradient) if step.exchange and step_in_epoch else None
        self.save(tag, epoch, "layer_parallel", step_in_epoch=step_in_epoch, exchange=exchange)

    def save(self, tag: str, epoch: int, phase: str, step_in_epoch: int = 0, exchange=None):
        self.store.flush(self.comm.barrier)
        save_run(self.run_dir, self.comm, self.cfg, self.parts, tag, epoch, phase, step_in_epoch, exchange)
        if self.comm.rank == 0:
            discard_set_aside(self.run_dir)
