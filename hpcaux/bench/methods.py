"""The methods `hpcaux bench` compares, as overrides of one base config.

Every method trains the same model on the same data subset with the same seed, epochs,
global batch and learning-rate schedule; only how the work is spread differs. K is the
number of cores (ranks) the parallel methods get.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    ranks_per_k: bool  # K ranks (else one process)
    kind: str = ""  # the built-in method a variant changes ("" for the built-ins themselves)
    extra: tuple = ()  # a variant's overrides, after the built-in's
    finetune_epochs: int | None = None  # a variant's own fine-tune length
    retired: bool = False  # a variant of a retired setting: its finished run is reused, never run again

    def ranks(self, K: int) -> int:
        return K if self.ranks_per_k else 1

    @property
    def layer_parallel(self) -> bool:
        """Whether it is an `hpcaux train` of method layer_parallel: the runs that stop after
        a number of epochs and resume (bench --max-epochs)."""
        return (self.kind or self.name) in LAYER_PARALLEL


PIPELINE_MICROBATCHES = 4  # the GPipe baseline's, as in every bench on record (parallel.microbatches' default)
SERIAL_1 = Method("serial_1thread", "serial backprop, 1 process x 1 thread", False)
SERIAL_K = Method("serial_kthreads", "serial backprop, 1 process x K threads", False)
DATA_PARALLEL = Method("data_parallel", "data parallel, K ranks x 1 thread", True)
PIPELINE = Method("pipeline", "pipeline (GPipe, torch.distributed.pipelining), K stages x 1 thread", True)
LP_PENALTY = Method("lp_penalty", "hpcaux layer-parallel, penalty, K ranks x 1 thread", True)
LP_AL = Method("lp_al", "hpcaux layer-parallel, augmented Lagrangian, K ranks x 1 thread", True)
LP_AL_FINETUNE = Method("lp_al_finetune", "hpcaux layer-parallel, AL + hybrid fine-tune, K ranks x 1 thread", True)

LAYER_PARALLEL = {m.name for m in (LP_PENALTY, LP_AL, LP_AL_FINETUNE)}
METHODS = {m.name: m for m in (SERIAL_1, SERIAL_K, DATA_PARALLEL, PIPELINE, LP_PENALTY, LP_AL, LP_AL_FINETUNE)}
REFERENCE = SERIAL_1.name


def variant(name: str, kind: str, overrides: list[str], finetune_epochs: int | None = None,
            retired: bool = False) -> Method:
    """A bench file's own method: a built-in one with more overrides (the accuracy ablation).
    `retired`: it uses a setting since retired (docs/results.md), so its row can only be
    reused from the run that measured it."""
    base = METHODS[kind]
    what = ", ".join(overrides + ([f"{finetune_epochs} fine-tune epochs"] if finetune_epochs else []))
    return Method(name, f"{base.label}; {what}" if what else base.label, base.ranks_per_k, kind, tuple(overrides),
                  finetune_epochs, retired)


def method_overrides(method: Method, K: int, batch: int, epochs: int, finetune_epochs: int,
                     backend: str) -> list[str]:
    """What turns the base config into `method` (applied after the bench's own overrides)."""
    if method.kind:
        return method_overrides(METHODS[method.kind], K, batch, epochs, method.finetune_epochs or finetune_epochs,
                                backend) + list(method.extra)
    finetune_epochs = max(1, min(finetune_epochs, epochs - 1))  # at least one epoch of each phase
    serial = ["method=serial", "parallel.K=1", "parallel.D=1", "parallel.cuts=[]"]
    layer_parallel = ["method=layer_parallel", f"parallel.K={K}", "parallel.D=1", "train.threads=1",
                      f"comm.backend={backend}"]
    return {
        SERIAL_1.name: serial + ["train.threads=1"],
        SERIAL_K.name: serial + [f"train.threads={K}"],
        # train.batch_size is per replica: K replicas of batch/K make the same global batch.
        DATA_PARALLEL.name: ["method=data_parallel", "parallel.K=1", "parallel.D=0", "parallel.cuts=[]",
                             "train.threads=1", f"train.batch_size={batch // K}", f"comm.backend={backend}"],
        # GPipe in four micro-batches whatever the base config's layer-parallel phase uses
        PIPELINE.name: ["method=pipeline", f"parallel.K={K}", "parallel.D=1", "train.threads=1", "comm.backend=torch",
                        f"parallel.microbatches={PIPELINE_MICROBATCHES}"],
        LP_PENALTY.name: layer_parallel + ["lp.loss=penalty", "train.finetune_epochs=0"],
        LP_AL.name: layer_parallel + ["lp.loss=al", "train.finetune_epochs=0"],
        # equal epochs in all: the fine-tune's epochs come out of the layer-parallel phase
        LP_AL_FINETUNE.name: layer_parallel + ["lp.loss=al", f"train.epochs={epochs - finetune_epochs}",
                                               f"train.finetune_epochs={finetune_epochs}"],
    }[method.name]
