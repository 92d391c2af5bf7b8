"""Config loading, overrides and the one-line errors for bad input."""
import subprocess

import pytest
import yaml

from conftest import HPCAUX, ROOT
from hpcaux.config import all_keys, config_from_dict, load_config
from hpcaux.errors import UserError

K2 = ROOT / "configs" / "cifar10_resnet20_auxnet.yaml"

pytestmark = pytest.mark.quick


def test_every_shipped_config_loads():
    from hpcaux.bench.methods import method_overrides
    from hpcaux.bench.spec import load_bench
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if "base" not in yaml.safe_load(path.read_text()):  # a training config, not a bench file
            load_config(path)
            continue
        spec = load_bench(path)
        for quick in (False, True):
            for name in (m for m in spec.methods if not spec.method(m).retired):  # retired: reused, never run
                load_config(spec.base, spec.overrides + (spec.quick if quick else []) +
                            method_overrides(spec.method(name), spec.K, 128, 10, spec.finetune_epochs, spec.backend))


def test_overrides_are_typed_and_win_over_the_file():
    cfg = load_config(K2, ["optim.lr=0.05", "train.epochs=3", "data.augment=false", "parallel.cuts=[5]"])
    assert cfg.optim.lr == 0.05 and cfg.train.epochs == 3 and cfg.data.augment is False
    assert cfg.parallel.cuts == [5] and cfg.parallel.K == 2


def test_documented_key_names_exist():
    for key in ("data.train_subset", "train.epochs", "train.batch_size", "optim.lr", "parallel.K",
                "parallel.D", "comm.backend", "seed"):
        assert key in all_keys()


BAD = [
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["optimizer.lr=0.1"], "unknown config key 'optimizer.lr'"),
    (["optim.lr=fast"], "config key 'optim.lr' must be float, got 'fast'"),
    (["optim.lr=-1"], "config key 'optim.lr' must be > 0.0, got -1.0"),
    (["train.epochs=0"], "config key 'train.epochs' must be >= 1, got 0"),
    (["train.batch_size=12.5"], "config key 'train.batch_size' must be int, got 12.5"),
    (["comm.backend=nccl"], "config key 'comm.backend' must be one of auto, horovod, torch, mpi4py; got 'nccl'"),
    (["model.arch=resnet21"], "config key 'model.arch' must be one of"),
    (["lp.multipliers=per-sample"], "config key 'lp.multipliers' is folded into another: it takes only per_sample, none"),
    (["lp.rho0=20"], "config key 'lp.rho_max' (10.0) is below 'lp.rho0' (20.0)"),
    (["lp.aux_source=stored"], "config key 'lp.aux_source' is stored, which needs 'data.augment: false'"),
    (["parallel.cuts=[6,4]"], "config key 'parallel.cuts' must be strictly increasing"),
    (["parallel.cuts=[4,6]"], "config key 'parallel.cuts' needs K-1 = 1 cut points, got 2"),
    (["optim.momentum=1.5"], "config key 'optim.momentum' must be <= 1.0, got 1.5"),
    (["data.augment=maybe"], "config key 'data.augment' must be bool, got 'maybe'"),
    (["seed"], "override 'seed' is not of the form key=value"),
    (["method=serial"], "config key 'parallel.K' must be 1 for method: serial"),
    (["lp.finetune_schedule=restart"], "config key 'lp.finetune_schedule' was retired: only continue remains"),
    (["lp.delayed_grad=replay"], "config key 'lp.delayed_grad' must be one of none, keep, fused; got 'replay'"),
    # a key that would do nothing here: an error naming it, not silence
    (["lp.z_lr=0.2"], "config key 'lp.z_lr' (0.2) does nothing in this config: it needs lp.aux_source stored"),
    (["lp.local_cls_weight=0", "lp.local_head=conv"],
     "config key 'lp.local_head' (conv) does nothing in this config: it needs lp.local_cls_weight > 0"),
    (["lp.aux_source=none", "lp.real_inputs=only", "auxnet.width=16"],
     "config key 'auxnet.width' (16) does nothing in this config: it needs lp.aux_source auxnet"),
    (["lp.aux_source=none", "lp.real_inputs=only", "lp.rho_growth=1.5"],
     "config key 'lp.rho_growth' (1.5) does nothing in this config: it needs an auxiliary target"),
]


def test_a_key_at_its_default_or_where_it_acts_is_no_error():
    """Only a changed value of an inert key is refused: the shipped K = 2 config writes
    lp.loss penalty (the default) beside lp.aux_source none, and a serial run ignores
    the AuxNet section of the base config a bench derives it from."""
    assert load_config(K2, ["lp.aux_source=none", "lp.real_inputs=only", "auxnet.width=32"]).auxnet.width == 32
    assert load_config(K2, ["method=serial", "parallel.K=1", "parallel.cuts=[]", "auxnet.width=8"]).method == "serial"
    assert load_config(K2, ["lp.local_head=conv"]).lp.local_head == "conv"


def test_a_folded_key_sets_the_key_it_was_folded_into():
    """lp.multipliers per_sample is lp.loss al (the augmented Lagrangian has per-sample
    multipliers and nothing else); none leaves the loss as it is."""
    assert load_config(K2, ["lp.multipliers=per_sample"]).lp.loss == "al"
    assert load_config(K2, ["lp.loss=al", "lp.multipliers=none"]).lp.loss == "al"
    assert load_config(K2, ["lp.multipliers=none"]).lp.loss == "penalty"


def test_a_retired_key_that_asks_for_what_remains_still_loads(tmp_path):
    """A run directory from before a key was retired resumes: its config names the key
    with the behaviour that remains (or, for a key that only meant something with a retired
    choice, any value)."""
    tree = yaml.safe_load(K2.read_text())
    tree["lp"].update(finetune_schedule="continue", finetune_lr=0.01)
    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump(tree))
    cfg = load_config(old)
    assert cfg.train.finetune_epochs == 0 and "finetune_schedule" not in cfg.to_yaml()


def test_a_run_saved_with_the_keys_since_moved_or_folded_loads_with_what_they_meant(tmp_path):
    """A run directory written before lp.microbatches and lp.finetune_epochs moved, lp.relay
    was retired and lp.real_source folded into lp.real_inputs (saved configs name every key,
    at its value) loads with the same layer-parallel phase: its micro-batches (not the
    parallel.microbatches its fine-tune had), its fine-tune epochs, its stored real inputs."""
    tree = yaml.safe_load(K2.read_text())
    tree["parallel"]["microbatches"] = 4
    tree["lp"].update(microbatches=1, finetune_epochs=2, relay=False, real_inputs="beside", real_source="store")
    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump(tree, sort_keys=False))
    cfg = load_config(old)
    assert (cfg.parallel.microbatches, cfg.train.finetune_epochs, cfg.lp.real_inputs) == (1, 2, "stored")
    assert not {"relay", "real_source", "microbatches", "finetune_epochs"} & set(yaml.safe_load(cfg.to_yaml())["lp"])
    assert load_config(K2, ["lp.real_source=exchange", "lp.real_inputs=beside"]).lp.real_inputs == "beside"


def test_the_exchange_relays_where_it_keeps_a_graph_for_the_returned_gradient():
    """Relay is no key: the AuxNet's exchange with a returned gradient relays (at K = 2 the
    same schedule as not relaying); without the returned gradient, stored real inputs or an
    AuxNet it does not."""
    relays = [load_config(K2, overrides).lp.relays for overrides in (
        ["lp.real_inputs=beside", "lp.delayed_grad=fused"], ["lp.real_inputs=only", "lp.delayed_grad=keep"],
        ["lp.real_inputs=beside"], ["lp.real_inputs=stored"],
        ["lp.aux_source=none", "lp.real_inputs=only", "lp.delayed_grad=fused"])]
    assert relays == [True, True, False, False, False]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_config_is_one_clear_error(overrides, message):
    with pytest.raises(UserError) as err:
        load_config(K2, overrides)
    assert message in str(err.value)


def test_bad_yaml_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(UserError, match="is not valid YAML at line"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must hold a mapping of keys, not list"):
        load_config(listy)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    nested = tmp_path / "nested.yaml"
    nested.write_text(yaml.safe_dump({"trian": {"epochs": 2}}))
    with pytest.raises(UserError, match="unknown config key 'trian'"):
        load_config(nested)


def test_cli_reports_bad_config_in_one_line_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([HPCAUX, "train", "--config", str(K2), "--out", str(out), "optim.lrr=0.1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["hpcaux: error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"]
    assert not out.exists()


def test_configuration_reference_is_up_to_date():
    from hpcaux.config_doc import render_reference

    assert (ROOT / "docs" / "configuration.md").read_text() == render_reference(), \
        "docs/configuration.md is stale: run python -m hpcaux.config_doc > docs/configuration.md"


def test_config_round_trips_through_yaml():
    cfg = load_config(K2, ["optim.lr=0.02"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_the_layer_parallel_objective_has_at_most_twelve_keys():
    """Issue 26: every lp key is a choice a user makes about the objective; a new one
    retires, folds or moves another (docs/results.md, "Twelve lp keys")."""
    assert len([key for key in all_keys() if key.startswith("lp.")]) <= 12
