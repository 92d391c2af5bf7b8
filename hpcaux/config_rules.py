"""The rules between config keys: which values of one key need which of another
(hpcaux.config checks each key on its own; these check the whole, once it is loaded).
Each broken rule is one UserError naming the key and what it needs."""
from __future__ import annotations

import typing

from hpcaux.errors import UserError
from hpcaux.models import IMAGENET_ARCHITECTURES

if typing.TYPE_CHECKING:
    from hpcaux.config import Config


def check_consistency(cfg: Config):
    """Raise a UserError naming the first key whose value contradicts another's."""
    _check_layer_parallel_keys(cfg)
    _check_method_model_and_data(cfg)
    _check_inert_keys(cfg)


def _has_auxiliary_target(cfg: Config) -> bool:
    return cfg.lp.aux_source != "none"


# Keys (or a whole section) that do nothing unless a condition holds: (key, condition,
# what it needs). A value other than the default where the condition fails is a setting
# that would be ignored in silence, and a run that reads as a measurement of it.
INERT_UNLESS = (
    ("lp.z_lr", lambda cfg: cfg.lp.aux_source == "stored", "lp.aux_source stored (it steps stored z)"),
    *((f"lp.{key}", _has_auxiliary_target, "an auxiliary target, lp.aux_source auxnet or stored (the penalty "
       "pulls towards it)") for key in ("rho0", "rho_growth", "rho_max")),
    ("lp.local_head", lambda cfg: cfg.lp.local_cls_weight > 0, "lp.local_cls_weight > 0 (a local classifier)"),
    ("auxnet", lambda cfg: cfg.lp.aux_source == "auxnet", "lp.aux_source auxnet (no AuxNet is built otherwise)"),
)


def _check_inert_keys(cfg: Config):
    """A key set to a non-default value where it does nothing is an error naming it.
    Layer-parallel runs only: a bench derives its serial rows from the same base config as
    its layer-parallel ones, so a serial run ignores the lp and auxnet sections by design."""
    if cfg.method != "layer_parallel":
        return
    from hpcaux.config import all_keys, value_of

    defaults = type(cfg)()
    for name, condition, needs in INERT_UNLESS:
        if condition(cfg):
            continue
        for key in (k for k in all_keys() if k == name or k.startswith(name + ".")):
            value = value_of(cfg, key)
            if value != value_of(defaults, key):
                raise UserError(f"config key '{key}' ({value}) does nothing in this config: it needs {needs}; "
                                f"remove it or set what it needs")


def _check_layer_parallel_keys(cfg: Config):
    if cfg.lp.delayed_grad != "none" and cfg.lp.real_inputs == "none":
        raise UserError(f"config key 'lp.delayed_grad' is {cfg.lp.delayed_grad} but 'lp.real_inputs' is none: "
                        "the delayed gradient is that of the real input; set lp.real_inputs=beside or only")
    if cfg.lp.real_inputs == "stored" and (cfg.lp.delayed_grad != "none" or cfg.lp.aux_source != "auxnet"):
        raise UserError("config key 'lp.real_inputs' is stored, which needs lp.delayed_grad none and lp.aux_source "
                        "auxnet (a stored output is an epoch old: no gradient goes back, and the AuxNet feeds the "
                        "first epoch)")
    if cfg.lp.real_inputs == "stored" and cfg.store.mode == "per_rank":
        raise UserError("config key 'lp.real_inputs' is stored, which needs the one shared HDF5 file "
                        "(store.mode mpio or auto), not per_rank: stage k+1 reads what stage k writes")
    if cfg.lp.aux_source == "none" and cfg.lp.real_inputs != "only":
        raise UserError("config key 'lp.aux_source' is none, which needs lp.real_inputs=only "
                        "(without an AuxNet the last stage trains on stage 1's real output alone)")
    if cfg.lp.aux_source == "none" and cfg.lp.loss == "al":
        raise UserError("config key 'lp.aux_source' is none, which needs lp.loss=penalty "
                        "(the multipliers belong to an AuxNet target)")
    if cfg.lp.weight_prediction and cfg.lp.delayed_grad not in ("keep", "fused"):
        raise UserError(f"config key 'lp.weight_prediction' is {cfg.lp.weight_prediction}, which needs "
                        f"lp.delayed_grad keep or fused (the weights of a kept forward), not {cfg.lp.delayed_grad}")
    M = cfg.parallel.microbatches
    if cfg.method == "layer_parallel" and M > 1 and (cfg.lp.aux_source == "stored" or cfg.lp.loss != "penalty"):
        raise UserError(f"config key 'parallel.microbatches' is {M}, which needs lp.aux_source auxnet or none and "
                        "lp.loss penalty in a layer-parallel run (stored z and per-sample multipliers are stepped "
                        "per batch); set parallel.microbatches=1")
    if cfg.lp.loss == "al_real" and not (cfg.lp.relays and cfg.parallel.K >= 3):
        raise UserError(f"config key 'lp.loss' is al_real, which needs the relayed exchange (lp.real_inputs beside "
                        f"or only, lp.delayed_grad keep or fused) and parallel.K >= 3, got real_inputs "
                        f"{cfg.lp.real_inputs}, delayed_grad {cfg.lp.delayed_grad} and K={cfg.parallel.K} (its "
                        f"multipliers are a middle stage's, on the relayed real input's gap to the AuxNet's target)")
    if cfg.method in ("layer_parallel", "pipeline") and cfg.train.batch_size % M:
        raise UserError(f"config key 'train.batch_size' ({cfg.train.batch_size}) is not a multiple of "
                        f"'parallel.microbatches' ({M})")
    if not cfg.lp.boundary_norm and cfg.lp.aux_source != "none":
        raise UserError("config key 'lp.boundary_norm' is false, which needs lp.aux_source=none (with auxiliary "
                        "targets the boundary norm keeps them from collapsing, docs/design.md §1)")
    if cfg.lp.real_inputs != "none" and cfg.lp.aux_source == "stored":
        raise UserError("config key 'lp.real_inputs' needs lp.aux_source auxnet (stored z has no real-input variant)")
    if cfg.lp.rho_max < cfg.lp.rho0:
        raise UserError(f"config key 'lp.rho_max' ({cfg.lp.rho_max}) is below 'lp.rho0' ({cfg.lp.rho0})")


def _check_method_model_and_data(cfg: Config):
    if cfg.method in ("serial", "data_parallel") and (cfg.parallel.K != 1):
        raise UserError(f"config key 'parallel.K' must be 1 for method: {cfg.method} (use method: layer_parallel)")
    if cfg.method == "pipeline" and (cfg.parallel.K < 2 or cfg.parallel.D not in (0, 1)):
        raise UserError("method pipeline needs parallel.K >= 2 stages and parallel.D = 1")
    if cfg.lp.aux_source == "stored" and cfg.data.augment:
        raise UserError("config key 'lp.aux_source' is stored, which needs 'data.augment: false' (one z per un-augmented sample)")
    if cfg.data.dataset == "imagenet" and cfg.model.arch not in IMAGENET_ARCHITECTURES:
        raise UserError(f"config key 'model.arch' is {cfg.model.arch}, a CIFAR model; data.dataset imagenet needs "
                        f"one of {', '.join(IMAGENET_ARCHITECTURES)}")
    if cfg.data.dataset != "imagenet" and cfg.model.arch in IMAGENET_ARCHITECTURES:
        raise UserError(f"config key 'model.arch' {cfg.model.arch} is an ImageNet model; use it with data.dataset: imagenet")
    if cfg.data.image_size and cfg.data.dataset != "imagenet":
        raise UserError(f"config key 'data.image_size' ({cfg.data.image_size}) applies to ImageNet folders only; "
                        f"{cfg.data.dataset} images keep their size")
    if sorted(set(cfg.parallel.cuts)) != list(cfg.parallel.cuts):
        raise UserError(f"config key 'parallel.cuts' must be strictly increasing, got {cfg.parallel.cuts}")
    if cfg.auxnet.head_layers and (len(cfg.auxnet.head_layers) != cfg.parallel.K - 1 or min(cfg.auxnet.head_layers) < 0):
        raise UserError(f"config key 'auxnet.head_layers' needs K-1 = {cfg.parallel.K - 1} counts >= 0, one per "
                        f"boundary, got {cfg.auxnet.head_layers}")
    if cfg.parallel.cuts and len(cfg.parallel.cuts) != cfg.parallel.K - 1:
        raise UserError(f"config key 'parallel.cuts' needs K-1 = {cfg.parallel.K - 1} cut points, got {len(cfg.parallel.cuts)}")


def check_layer_parallel_world(cfg: Config, D: int, store_mode: str):
    """The rules that need the job's shape: the replicas D the world holds and the store
    mode `store.mode` resolves to ('mpio' or 'per_rank')."""
    K = cfg.parallel.K
    if cfg.lp.aux_source == "none" and K > 2 and cfg.lp.delayed_grad not in ("keep", "fused"):
        raise UserError(f"config key 'lp.aux_source' none with parallel.K={K} needs lp.delayed_grad keep or fused, "
                        f"got {cfg.lp.delayed_grad} (a middle stage returns its input gradient from the graph it kept)")
    if cfg.lp.aux_source == "stored" and D > 1:
        raise UserError("config key 'lp.aux_source' stored needs parallel.D=1 (each replica would update different z)")
    if cfg.lp.real_inputs == "stored" and store_mode != "mpio":
        raise UserError("config key 'lp.real_inputs' is stored, which needs the one shared HDF5 file, but this job "
                        "would write per-rank files (store.mode auto needs parallel h5py and an MPI launch)")
    if cfg.lp.loss != "penalty" and D > 1 and cfg.store.mode == "per_rank":
        raise UserError(f"config key 'lp.loss' {cfg.lp.loss} with parallel.D > 1 needs store.mode mpio "
                        "(the replicas of a stage share one multiplier array)")
