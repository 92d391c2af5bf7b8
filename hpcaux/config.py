"""Run configuration: dataclasses, YAML loading, `key=value` overrides, validation.

Every key a user can set lives in one of the dataclasses below, so the dataclasses are
the reference (docs/configuration.md is generated from them and checked by a test).
Validation happens before anything is written: an unknown key, a wrong type or an
impossible value raises UserError naming the dotted key, with the closest valid key
when it looks like a typo; the rules between keys are in hpcaux.config_rules.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hpcaux.config_history import OLD_KEYS, translate
from hpcaux.config_rules import check_consistency
from hpcaux.errors import UserError
from hpcaux.models import ARCHITECTURES
from hpcaux.models.auxnet import DEFAULT_DEPTH, DEFAULT_WIDTH

MODELS = tuple(ARCHITECTURES)
DATASETS = ("cifar10", "cifar100", "imagenet")


@dataclass
class DataConfig:
    """Where the data set is and how much of it to use."""
    dataset: str = field(default="cifar10", metadata={"choices": DATASETS})
    root: str = field(default="data", metadata={"help": "folder holding cifar-10-batches-py/ (or the ImageNet train/ and val/ folders)"})
    val_subset: int = field(default=5000, metadata={"min": 0, "help": "training images held out as the validation split (stratified, drawn by data.val_seed, never trained on): the per-epoch metrics, time to accuracy and every choice are measured on it, the test set only at the end; 0 = no split (the per-epoch metrics on the test set)"})
    val_seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1, "help": "draws the validation split, the same for every run seed"})
    train_subset: int = field(default=0, metadata={"min": 0, "help": "stratified subset (drawn by the run seed) of the training images outside the validation split; 0 = all of them"})
    test_subset: int = field(default=0, metadata={"min": 0, "help": "stratified subset of the test set for the final evaluation; 0 = all"})
    eval_subset: int = field(default=0, metadata={"min": 0, "help": "held-out images for the per-epoch metrics: a stratified subset of the validation split (of the test set with data.val_subset 0); 0 = all of it"})
    image_size: int = field(default=0, metadata={"min": 0, "help": "ImageNet folders: the training crop in pixels (evaluated on a centre crop after resizing to 256/224 of it); 0 = 224"})
    augment: bool = field(default=True, metadata={"help": "random crop (4-pixel padding) and horizontal flip"})
    workers: int = field(default=4, metadata={"min": 0, "help": "loader workers (ImageNet only)"})


@dataclass
class ModelConfig:
    arch: str = field(default="resnet20", metadata={"choices": MODELS})


@dataclass
class TrainConfig:
    epochs: int = field(default=10, metadata={"min": 1})
    finetune_epochs: int = field(default=0, metadata={"min": 0, "help": "layer-parallel runs: epochs of end-to-end backprop across the ranks after the train.epochs layer-parallel ones, a GPipe pipeline of parallel.microbatches micro-batches, on the same learning-rate schedule and stage optimisers"})
    batch_size: int = field(default=128, metadata={"min": 1, "help": "per replica"})
    eval_batch_size: int = field(default=500, metadata={"min": 1})
    threads: int = field(default=0, metadata={"min": 0, "help": "torch threads per rank; 0 = cores / ranks on this node"})
    device: str = field(default="auto", metadata={"choices": ("auto", "cuda", "cpu"), "help": "auto: one GPU per rank where there are GPUs, else the CPU; cuda: fail without a GPU"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar on rank 0"})
    precision: str = field(default="fp32", metadata={"choices": ("fp32", "bf16"), "help": "bf16: the training forward passes under bfloat16 autocast (weights, gradients, boundaries and evaluation stay float32); not with method pipeline"})
    channels_last: bool = field(default=False, metadata={"help": "weights and inputs in the channels_last (NHWC) memory format, faster convolutions on GPUs; not with method pipeline"})
    sync_every: int = field(default=0, metadata={"min": 0, "help": "steps between the host's reads of the losses and the stop vote; 0 = 1 on CPUs, 50 on GPUs (a read waits for the device)"})


@dataclass
class OptimConfig:
    lr: float = field(default=0.1, metadata={"min_exclusive": 0.0})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    weight_decay: float = field(default=5e-4, metadata={"min": 0.0})
    nesterov: bool = False
    schedule: str = field(default="cosine", metadata={"choices": ("cosine", "step", "constant")})
    milestones: typing.List[float] = field(default_factory=lambda: [0.5, 0.75], metadata={"help": "step schedule: fractions of the run where lr *= gamma"})
    gamma: float = field(default=0.1, metadata={"min_exclusive": 0.0})
    warmup_epochs: int = field(default=0, metadata={"min": 0})
    label_smoothing: float = field(default=0.0, metadata={"min": 0.0, "max": 0.5, "help": "of every cross-entropy a trainer minimises (classifier and local heads); evaluation is unaffected"})


@dataclass
class ParallelConfig:
    K: int = field(default=1, metadata={"min": 1, "help": "number of stages (ranks per replica)"})
    D: int = field(default=1, metadata={"min": 0, "help": "data-parallel replicas of each stage; 0 = world size / K (the sbatch scripts pass 0)"})
    balance: str = field(default="time", metadata={"choices": ("time", "flops", "params"), "help": "what the partition balances across stages: time = stage times measured side by side as the job runs them (docs/design.md §6)"})
    cuts: typing.List[int] = field(default_factory=list, metadata={"help": "explicit cut points (block indices), overriding balance"})
    microbatches: int = field(default=4, metadata={"min": 1, "help": "M: each step's batch goes through the stages as M micro-batches, the weights stepped once per batch (method pipeline; the layer-parallel phase and its fine-tune). In the layer-parallel pipeline without an AuxNet (lp.aux_source none) stage k's gradient is 2(K-1-k)/M steps late instead of 2(K-1-k) (PipeDream-2BW's schedule), with the AuxNet's exchange every returned gradient 2/M steps late; BatchNorm sees micro-batches (docs/algorithm.md). 1: whole batches"})


@dataclass
class CommConfig:
    backend: str = field(default="auto", metadata={"choices": ("auto", "horovod", "torch", "mpi4py"), "help": "auto: torch.distributed (gloo) on CPUs; on GPUs Horovod where installed, except for runs that send activations every step (method pipeline, lp.real_inputs by exchange), which take torch.distributed (NCCL point to point, on the device) (docs/benchmarks.md)"})
    timeout_s: float = field(default=300.0, metadata={"min_exclusive": 0.0, "help": "watchdog: a collective or send/recv that waits longer aborts the job"})


@dataclass
class AuxNetConfig:
    """The auxiliary-variable network: its cost per step bounds the speedup."""
    width: int = field(default=DEFAULT_WIDTH, metadata={"min": 1})
    depth: int = field(default=DEFAULT_DEPTH, metadata={"min": 1, "help": "3x3 conv layers of the trunk at half resolution (docs/results.md: depth 1 costs 0.08 of a stage, depth 2 0.18)"})
    head_layers: typing.List[int] = field(default_factory=list, metadata={"help": "3x3 conv layers (with ReLU, strided down to the boundary's size) of each boundary's own head, one count per boundary (K-1 values; empty: none), so that deeper boundaries get deeper predictors (docs/accuracy.md)"})


@dataclass
class LayerParallelConfig:
    """The joint objective of docs/design.md §1."""
    loss: str = field(default="penalty", metadata={"choices": ("penalty", "al", "al_real"), "help": "penalty: rho/2 x the mean squared gap to the AuxNet's targets; al: the augmented Lagrangian, with per-sample multipliers in RUN/aux.h5 (docs/algorithm.md); al_real (the relayed exchange, K >= 3): the penalty on the AuxNet's input, the augmented Lagrangian on the relayed real input's gap to the AuxNet's target"})
    rho0: float = field(default=1.0, metadata={"min_exclusive": 0.0})
    rho_growth: float = field(default=1.2, metadata={"min_exclusive": 0.0, "help": "rho *= rho_growth after every epoch, capped at rho_max; below 1 the pull towards the AuxNet's targets decays as the real inputs take over (docs/accuracy.md)"})
    rho_max: float = field(default=10.0, metadata={"min_exclusive": 0.0})
    aux_source: str = field(default="auxnet", metadata={"choices": ("auxnet", "stored", "none"), "help": "where a stage's input and target come from: the AuxNet, stored z, or nowhere (none, with lp.real_inputs only: a delayed-gradient pipeline without an AuxNet, every stage on its predecessor's real output; docs/algorithm.md)"})
    z_lr: float = field(default=0.5, metadata={"min_exclusive": 0.0, "max": 2.0, "help": "stored auxiliary variables (aux_source: stored): the fraction of the way to the consistency minimiser each step moves z (docs/algorithm.md)"})
    local_cls_weight: float = field(default=1.0, metadata={"min": 0.0})
    boundary_norm: bool = field(default=True, metadata={"help": "a layer norm without parameters at the end of every non-last stage, so the AuxNet's target cannot shrink to zero (docs/design.md §1); false (aux_source none only) composes the stages into exactly the serial network"})
    local_head: str = field(default="linear", metadata={"choices": ("linear", "conv", "conv2"), "help": "each non-last stage's local classifier: pooled linear, or a stride-2 3x3 convolution before it (conv), or that and a second 3x3 convolution (conv2, as deep as DGL's heads)"})
    real_inputs: str = field(default="none", metadata={"choices": ("none", "beside", "only", "stored"), "help": "stage k+1 also trains on stage k's real output: of the previous step, sent non-blocking (beside the AuxNet prediction, or only on it once it arrives), or stored (beside the AuxNet prediction, stage k's output for the same sample in the previous epoch, through RUN/aux.h5: no messages between the stages; needs the one shared HDF5 file and lp.delayed_grad none). With the AuxNet, lp.delayed_grad keep or fused and K >= 3 the exchange relays: a middle stage sends on its output on the real input it received, so stage k's real input is F_{k-1}(...F_0(x)) of the batch k steps back and every returned gradient stays two steps (micro-batches) late whatever K is (docs/algorithm.md)"})
    delayed_grad: str = field(default="none", metadata={"choices": ("none", "keep", "fused"), "help": "stage k back-propagates stage k+1's gradient of that real input, one step later still, through the graph it kept (fused: together with its own term of that batch, one backward per step; needs real_inputs)"})
    weight_prediction: int = field(default=0, metadata={"min": 0, "max": 8, "help": "with lp.delayed_grad keep or fused: run the kept forward at the weights predicted n steps ahead (w - n x lr x momentum buffer), n = N for every two steps of the stage's delay (2: those the delayed gradient will be applied to); 0: at the current weights (docs/algorithm.md)"})

    @property
    def exchanges(self) -> bool:
        """Whether real inputs travel between neighbouring ranks by message, every step
        (lp.real_inputs beside or only): the neighbour exchange, or the pipeline."""
        return self.real_inputs in ("beside", "only")

    @property
    def relays(self) -> bool:
        """Whether the AuxNet's exchange relays the real inputs along the chain: a middle
        stage sends on its output on the real input it received and keeps that graph for
        the returned gradient. Without relay, a middle stage of K >= 3 sends its output on
        the AuxNet's prediction, and stages after the second never see the composition the
        test-time network feeds them (docs/accuracy.md measured it 10 points worse at K = 4);
        at K = 2 the two are the same schedule, there being no middle stage."""
        return self.exchanges and self.delayed_grad in ("keep", "fused") and self.aux_source == "auxnet"


@dataclass
class StoreConfig:
    """RUN/aux.h5 (docs/design.md §4)."""
    mode: str = field(default="auto", metadata={"choices": ("auto", "mpio", "per_rank"), "help": "auto: one shared file via parallel HDF5 where h5py has it and MPI launched the job, else per-rank files joined by a virtual index"})
    float16: bool = field(default=False, metadata={"help": "store z and lambda as float16"})
    probe_size: int = field(default=64, metadata={"min": 0, "help": "held-out images whose AuxNet outputs are snapshot every epoch"})


@dataclass
class CheckpointConfig:
    every: int = field(default=1, metadata={"min": 0, "help": "checkpoint every N epochs (0: only at the end)"})


@dataclass
class Config:
    method: str = field(default="serial", metadata={"choices": ("serial", "layer_parallel", "data_parallel", "pipeline"),
                                                    "help": "data_parallel and pipeline are the baselines of hpcaux bench (docs/benchmarks.md)"})
    seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    auxnet: AuxNetConfig = field(default_factory=AuxNetConfig)
    lp: LayerParallelConfig = field(default_factory=LayerParallelConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@functools.lru_cache(maxsize=None)
def all_keys(cls=None, prefix="") -> dict:
    """Every dotted key of the config tree, mapped to (type, dataclass field)."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    keys = {}
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            keys.update(all_keys(typ, f"{prefix}{f.name}."))
        else:
            keys[prefix + f.name] = (typ, f)
    return keys


def value_of(cfg: Config, key: str):
    """The value of a dotted key (`lp.rho0`) in a config."""
    return functools.reduce(getattr, key.split("."), cfg)


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, list(all_keys()), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, typ, value):
    """Convert a YAML or command-line value to the field's type, or say why not."""
    origin = typing.get_origin(typ)
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item,) = typing.get_args(typ)
        return [_coerce(key, item, v) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .nan and .inf would pass every range check below
                raise UserError(f"config key '{key}' must be a finite number, got {value!r}")
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    raise UserError(f"config key '{key}' must be {typ.__name__}, got {value!r}")


def _check_range(key: str, f, value):
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise UserError(f"config key '{key}' must be one of {', '.join(meta['choices'])}; got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise UserError(f"config key '{key}' must be >= {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise UserError(f"config key '{key}' must be <= {meta['max']}, got {value!r}")
    if "min_exclusive" in meta and value <= meta["min_exclusive"]:
        raise UserError(f"config key '{key}' must be > {meta['min_exclusive']}, got {value!r}")


def _flatten(tree: dict, prefix="") -> dict:
    flat = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            if not any(key.startswith(name + ".") for key in all_keys()):
                raise _unknown_key(name)
            flat.update(_flatten(v, name + "."))
        else:
            flat[name] = v
    return flat


def _set(cfg: Config, key: str, raw):
    if key in OLD_KEYS:
        for new_key, value in translate(key, raw):
            _set(cfg, new_key, value)
        return
    keys = all_keys()
    if key not in keys:
        raise _unknown_key(key)
    typ, f = keys[key]
    value = _coerce(key, typ, raw)
    if not isinstance(value, list):
        _check_range(key, f, value)
    *path, leaf = key.split(".")
    target = cfg
    for part in path:
        target = getattr(target, part)
    setattr(target, leaf, value)


def parse_override(text: str) -> tuple[str, object]:
    """`optim.lr=0.05` -> ('optim.lr', 0.05); the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently, so a typo'd duplicate would override the intended value unseen)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file that must hold a mapping, with one clear line for each way it can fail."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = f": {err.problem}" if getattr(err, "problem", None) and "duplicate" in err.problem else ""
        raise UserError(f"{what} {path} is not valid YAML{where}{problem}") from None
    if tree is None:  # an empty file (or only comments): the defaults
        return {}
    if not isinstance(tree, dict):
        raise UserError(f"{what} {path} must hold a mapping of keys, not {type(tree).__name__}")
    return tree


def load_config(path: str | Path | None = None, overrides=()) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides; validated as a whole."""
    cfg = Config()
    if path is not None:
        for key, value in _flatten(read_yaml_mapping(path, "config file")).items():
            _set(cfg, key, value)
    for text in overrides:
        _set(cfg, *parse_override(text))
    check_consistency(cfg)
    return cfg


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config saved in a run directory (summary, checkpoint manifest). A run saved
    before `data.val_subset` existed had no validation split: it resumes without one."""
    cfg = Config()
    if "val_subset" not in tree.get("data", {}):
        cfg.data.val_subset = 0
    for key, value in _flatten(tree).items():
        _set(cfg, key, value)
    return cfg
