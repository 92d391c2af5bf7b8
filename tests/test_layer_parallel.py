"""Layer-parallel training under real mpirun: gradients, composition, replicas, end-to-end runs."""
import json
import math

import pytest
import torch

from conftest import HPCAUX, ROOT, assert_same_final_weights, check, every_backend, installed_backends, mpirun, run
from hpcaux.config import load_config
from hpcaux.train.lp.metrics import NORM_BATCHES
from hpcaux.train.run.schedules import learning_rate

SCRIPTS = ROOT / "tests" / "mpi"


def _check_script(np, script, *args, timeout=240):
    return check(mpirun(np, ["python", str(SCRIPTS / script), *map(str, args)], timeout=timeout)).stdout


@pytest.mark.parametrize("np", [2, 3])
@pytest.mark.parametrize("backend", every_backend())
def test_gradients_equal_single_process_joint_loss(backend, np, cifar_root, tmp_path):
    out = _check_script(np, "check_gradients.py", backend, cifar_root, tmp_path, np, 1, "penalty", "al")
    assert out.count("penalty gradients match") == np
    assert out.count("al gradients match") == np


@pytest.mark.parametrize("backend", every_backend())
def test_k2_d2_gradients_equal_one_process_on_the_global_batch(backend, cifar_root, tmp_path):
    """Replicas agreeing with each other is not enough (a wrongly scaled average passes
    that): the averaged gradients must be those of L over both replicas' batches."""
    out = _check_script(4, "check_gradients.py", backend, cifar_root, tmp_path, 2, 2, "penalty", "al")
    assert out.count("penalty gradients match") == 4 and out.count("al gradients match") == 4


def test_stored_z_gradients_and_z_step_equal_one_process(cifar_root, tmp_path):
    out = _check_script(2, "check_gradients.py", installed_backends()[0], cifar_root, tmp_path, 2, 1, "stored")
    assert out.count("stored gradients match") == 2


@pytest.mark.parametrize("K,D,M", [(2, 1, 1), (2, 1, 4), (3, 1, 2), (2, 2, 4)])
def test_finetune_step_equals_one_process_backprop(K, D, M, cifar_root, tmp_path):
    """M micro-batches (a GPipe pipeline): the gradient of one process on the same micro-batches."""
    out = _check_script(K * D, "check_finetune.py", installed_backends()[0], cifar_root, tmp_path, K, D, M)
    assert out.count("fine-tune gradients match") == K * D


@pytest.mark.parametrize("mode", ["keep", "fused", "auxless"])
@pytest.mark.parametrize("backend", every_backend())
def test_neighbour_exchange_sends_real_inputs_and_applies_delayed_gradients(mode, backend, cifar_root, tmp_path):
    out = _check_script(2, "check_exchange.py", backend, cifar_root, tmp_path, mode)
    assert f"exchange ({mode}): real inputs one step late" in out


@pytest.mark.parametrize("mode", ["keep", "fused"])
def test_relay_passes_real_inputs_along_the_chain_with_every_gradient_two_steps_late(mode, cifar_root, tmp_path):
    """The relayed exchange at K = 3 (the AuxNet at every boundary): stage 2 trains on stage 1's output
    on stage 0's output, stage 1 returns its real-input term's gradient with the AuxNet
    target of that batch, and a stop settles the chain (tests/mpi/check_relay.py)."""
    out = _check_script(3, "check_relay.py", installed_backends()[0], cifar_root, tmp_path, mode)
    assert f"relay ({mode}): real inputs along the chain, every gradient two steps late" in out


def test_real_input_multipliers_are_the_relayed_residual_and_used_the_next_epoch(cifar_root, tmp_path):
    """lp.loss al_real at K = 3: stage 1's lambda_real rows after an epoch are rho x its
    real-input output's gap to the AuxNet target of that batch, the next epoch's real term
    carries them, and a stop settles (tests/mpi/check_real_multipliers.py)."""
    out = _check_script(3, "check_real_multipliers.py", installed_backends()[0], cifar_root, tmp_path)
    assert "al_real: the real-input term's multipliers are rho x its residual" in out


def test_real_inputs_from_the_store_are_the_previous_epochs_outputs(cifar_root, tmp_path):
    """lp.real_inputs stored: stage 2 trains on what stage 1 wrote to aux.h5 for the same
    samples one epoch earlier (nothing in the first), in buffers that alternate by epoch."""
    out = _check_script(2, "check_stored_real.py", installed_backends()[0], cifar_root, tmp_path)
    assert "stored real inputs: epoch 2 reads epoch 1's outputs; 112 and 112 rows written" in out


@pytest.mark.parametrize("np,backend,mode,M", [(3, "torch", "keep", 1), (4, "mpi4py", "fused", 1),
                                              (3, "mpi4py", "fused", 4)])
def test_pipeline_without_auxnet_applies_the_gradients_of_the_delayed_composed_network(np, backend, mode, M, cifar_root,
                                                                                       tmp_path):
    """K > 2 without an AuxNet: every stage on its predecessor's real output, each stage's
    gradient that of the whole network at the weights each stage ran the (micro-)batch at."""
    out = _check_script(np, "check_chained.py", backend, cifar_root, tmp_path, mode, M)
    assert f"chained pipeline ({mode}, K={np}, M={M}):" in out and "equal the delayed composed network's" in out


def test_pipeline_step_equals_one_process_backprop(cifar_root, tmp_path):
    out = _check_script(2, "check_pipeline.py", cifar_root, tmp_path, 2)
    assert out.count("pipeline gradients match") == 2


@pytest.mark.parametrize("np", [2, 3])
def test_composed_evaluation_equals_single_process(np, cifar_root, tmp_path):
    backend = installed_backends()[0]
    assert "across ranks ==" in _check_script(np, "check_composed.py", backend, cifar_root, tmp_path)


@pytest.mark.parametrize("backend", every_backend())
def test_k2_d2_keeps_replicas_identical(backend, cifar_root, tmp_path):
    assert _check_script(4, "check_replicas.py", backend, cifar_root, tmp_path, 2, 2).count("identical") == 4


@pytest.mark.quick
def test_al_update_matches_formula_on_hand_example():
    from hpcaux.train.lp.losses import al_update

    lam = torch.tensor([1.0, -1.0, 0.0])
    residual = torch.tensor([0.5, 2.0, -0.25])
    assert torch.equal(al_update(lam, residual, rho=2.0), torch.tensor([2.0, 3.0, -0.5]))


@pytest.mark.quick
def test_stage_term_values_on_hand_example():
    from hpcaux.train.lp.losses import stage_term

    out, target = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    lam = torch.tensor([[1.0, 1.0]])
    term = stage_term(out, target, torch.tensor([0]), is_last=False, rho=2.0, multiplier=lam)
    # rho/2 * mean([1, 4]) + mean([1*1, 1*2]) = 2.5 + 1.5
    assert term.loss.item() == pytest.approx(4.0)
    assert torch.equal(term.residual, torch.tensor([[1.0, 2.0]]))


def _lp_run(tmp_path, cifar_root, np, *overrides, timeout=400, config="cifar10_resnet20_auxnet.yaml"):
    out = tmp_path / "run"
    proc = check(mpirun(np, [HPCAUX, "train", "--config", str(ROOT / "configs" / config),
                             "--out", str(out), f"data.root={cifar_root}", "train.progress=false",
                             f"comm.backend={installed_backends()[0]}", *overrides], timeout=timeout))
    return proc, json.loads((out / "summary.json").read_text()), \
        [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], out


def test_stored_mode_runs_end_to_end(tmp_path, cifar_root):
    _, summary, metrics, _ = _lp_run(tmp_path, cifar_root, 2, "lp.aux_source=stored", "data.augment=false",
                                     "parallel.cuts=[4]", "data.train_subset=256", "train.epochs=2", "train.batch_size=32",
                                     "data.eval_subset=200", "data.test_subset=500")
    assert summary["aux_source"] == "stored" and summary["auxnet_path_acc"] is None
    assert len(metrics) == 2
    # held-out accuracy over exactly data.eval_subset images, counted once across the ranks
    assert all(m["composed_acc"] * 200 == pytest.approx(round(m["composed_acc"] * 200), abs=1e-6) for m in metrics)
    # z lives behind a boundary normalisation (unit RMS per sample) and its steps stay small
    assert all(0.5 < m["z_std"][0] < 2.0 for m in metrics), metrics
    # the z of the batch travel in the one allreduce: batch x boundary elements
    assert summary["allreduce_values_per_step"] == 32 * 16 * 32 * 32


def test_the_k2_config_runs_without_an_auxnet_resumes_at_an_epoch_and_eval_agrees(tmp_path, cifar_root):
    """The shipped K = 2 config is the pipeline without an AuxNet (lp.aux_source=none): no
    AuxNet anywhere (no metrics, no checkpoint file, no allreduce of its gradients); the
    exchange drains at every epoch's end, so a run stopped there and resumed ends with the
    weights of an uninterrupted one; `hpcaux analyze` reads its store."""
    auxless = ["parallel.cuts=[4]", "data.train_subset=256", "train.epochs=2", "train.batch_size=32",
               "data.eval_subset=200", "data.test_subset=500"]
    proc, summary, metrics, out = _lp_run(tmp_path, cifar_root, 2, *auxless, config="cifar10_resnet20_k2.yaml")
    table = check(run([HPCAUX, "analyze", str(out / "aux.h5"), "--out", str(tmp_path / "plots")],
                      timeout=120)).stdout.splitlines()
    assert table[0].split()[:3] == ["epoch", "rho", "composed"] and [r.split()[0] for r in table[1:3]] == ["1", "2"]
    header = table[0].split()
    assert not {"auxnet-path", "gap[0]", "train_gap[0]", "z_mean[0]", "drift[0]", "probe_gap[0]"} & set(header)
    assert "real_drift[0]" in header  # the composed network's boundary activation on the probe images
    assert "-" not in table[2].split()  # only the columns the run has (a drift needs two epochs)
    assert [c for c, v in zip(header, table[1].split()) if v == "-"] == ["real_drift[0]"]
    assert "returned gradient applied after (optimiser steps) per stage: 0.5 0" in table  # 2 ticks at M = 4
    assert summary["aux_source"] == "none" and summary["auxnet_path_acc"] is None
    assert summary["allreduce_values_per_step"] == 0 and summary["aux_ms_per_rank"][0] < 5
    assert all(m["train_rel_gap"] is None and m["stage_loss"][1] > 0 for m in metrics), metrics
    assert " gap " not in proc.stdout and "auxnet-path" not in proc.stdout
    assert sorted(p.name for p in (out / "ckpt" / "final").iterdir()) == ["manifest.json", "stage_0.pt", "stage_1.pt"]
    stopped = tmp_path / "stopped"
    train = [HPCAUX, "train", "--config", str(ROOT / "configs" / "cifar10_resnet20_k2.yaml"), "--out", str(stopped),
             f"data.root={cifar_root}", "train.progress=false", f"comm.backend={installed_backends()[0]}", *auxless]
    check(mpirun(2, train + ["--max-epochs", "1"], timeout=300))
    check(mpirun(2, [HPCAUX, "train", "--resume", str(stopped)], timeout=300))
    assert_same_final_weights(out, stopped, files=("stage_0.pt", "stage_1.pt"))
    evaluated = check(mpirun(1, [HPCAUX, "eval", str(out), "--subset", "500"], timeout=120))
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["test_acc"] == pytest.approx(summary["test_acc"],
                                                                                             abs=1e-9)


def test_the_relay_k4_config_stores_every_boundary_and_analyze_shows_them(tmp_path, cifar_root):
    """The shipped AuxNet configuration at K = 4 (relay, convolutional local heads) under
    four ranks: its store holds the AuxNet's prediction and the composed network's
    activation at all three boundaries, and `hpcaux analyze` shows a column for each with
    no empty cell once two epochs give a drift."""
    _, summary, _, out = _lp_run(tmp_path, cifar_root, 4, "data.train_subset=256", "train.epochs=2",
                                 "train.batch_size=32", "data.eval_subset=200", "data.test_subset=500",
                                 "auxnet.width=8", config="cifar10_resnet20_relay_k4.yaml")
    table = check(run([HPCAUX, "analyze", str(out / "aux.h5"), "--out", str(tmp_path / "plots")],
                      timeout=120)).stdout.splitlines()
    header = table[0].split()
    for b in range(3):
        assert {f"gap[{b}]", f"probe_gap[{b}]", f"drift[{b}]", f"real_drift[{b}]"} <= set(header), header
    assert "auxnet-path" in header and "-" not in table[2].split(), table[:3]
    assert summary["K"] == 4 and summary["auxnet_path_acc"] is not None


def test_without_the_boundary_norm_the_stages_compose_into_the_serial_network(tmp_path, cifar_root):
    """lp.boundary_norm=false (aux_source none): the two stages' weights, loaded into the
    serial ResNet-20 block by block, give the accuracy the run reported, and so does
    `hpcaux eval`, which rebuilds the stages from the run's config."""
    import torch

    from hpcaux.config import config_from_dict
    from hpcaux.data.sets import load_data
    from hpcaux.models import build_model
    from hpcaux.store.checkpoint import latest_checkpoint, load_file
    from hpcaux.train.run.evaluate import evaluate_model

    _, summary, _, out = _lp_run(tmp_path, cifar_root, 2, "parallel.cuts=[4]", "lp.boundary_norm=false",
                                 "data.train_subset=512", "train.epochs=2", "train.batch_size=64",
                                 "data.eval_subset=200", "data.test_subset=500", config="cifar10_resnet20_k2.yaml")
    folder, manifest = latest_checkpoint(out)
    cfg = config_from_dict(manifest["config"])
    data = load_data(cfg.data, cfg.seed)
    serial = build_model("resnet20", data.num_classes)
    starts = [0, *manifest["cuts"]]
    for k, start in enumerate(starts):
        for key, value in load_file(folder / f"stage_{k}.pt")["stage"].items():
            _, index, rest = key.split(".", 2)  # blocks.<i>.<parameter>
            serial.state_dict()[f"{start + int(index)}.{rest}"].copy_(value)
    acc = evaluate_model(serial, data, "test", cfg.train.eval_batch_size, torch.device("cpu"), subset=500, seed=cfg.seed)
    assert acc == pytest.approx(summary["test_acc"], abs=1e-9)
    # a network that predicts one class would tie any other: the equality says something
    # only when the trained weights tell images apart (an accuracy threshold after a few
    # steps depends on the CPU's kernels)
    x, _ = next(iter(data.heldout_batches("test", 500, device=torch.device("cpu"), subset=500, seed=cfg.seed)))
    serial.eval()
    with torch.no_grad():
        assert serial(x).argmax(1).unique().numel() >= 3
    evaluated = check(run([HPCAUX, "eval", str(out), "--subset", "500"], timeout=120))
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["test_acc"] == pytest.approx(acc, abs=1e-9)


@pytest.mark.quick
def test_hybrid_finetune_and_al_run_end_to_end_and_eval_agrees(tmp_path, cifar_root):
    """One cosine over both phases (8 steps each), so the layer-parallel epoch ends at step
    8 of 16 and the fine-tune at 16."""
    _, summary, metrics, out = _lp_run(tmp_path, cifar_root, 2, "lp.loss=al",
                                       "train.finetune_epochs=1", "data.train_subset=256", "train.epochs=1",
                                       "train.batch_size=32", "data.eval_subset=200", "data.test_subset=500",
                                       "optim.warmup_epochs=0")
    assert [m["phase"] for m in metrics] == ["layer_parallel", "finetune"]
    assert summary["finetune_epochs"] == 1 and summary["finetune_s"] > 0
    optim = load_config(out / "config.yaml").optim
    assert [m["lr"] for m in metrics] == pytest.approx([learning_rate(optim, 7, 16, 8), learning_rate(optim, 15, 16, 8)])
    proc = check(mpirun(1, [HPCAUX, "eval", str(out), "--subset", "500"], timeout=120))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-9)


@pytest.mark.parametrize("config", ["cifar10_resnet20_k2.yaml", "cifar10_resnet20_auxnet.yaml"])
def test_bf16_and_channels_last_train_both_phases_and_eval_in_float32_agrees(config, tmp_path, cifar_root):
    """train.precision=bf16 with train.channels_last: the AuxNet, the stages, the neighbour
    exchange and the pipelined fine-tune run their forward passes that way; the boundaries
    and the checkpoint stay float32, so `hpcaux eval` counts what the run counted."""
    _, summary, metrics, out = _lp_run(tmp_path, cifar_root, 2, "train.precision=bf16", "train.channels_last=true",
                                       "train.finetune_epochs=1", "data.train_subset=256", "train.epochs=1",
                                       "train.batch_size=32", "data.eval_subset=200", "data.test_subset=500",
                                       "parallel.cuts=[4]", config=config)
    assert summary["precision"] == "bf16" and summary["channels_last"] is True
    assert [m["phase"] for m in metrics] == ["layer_parallel", "finetune"]
    assert all(math.isfinite(v) for m in metrics for v in m["stage_loss"]), metrics
    proc = check(mpirun(1, [HPCAUX, "eval", str(out), "--subset", "500"], timeout=120))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-9)


def test_stages_trained_on_predictions_are_measured_with_the_composed_networks_norm_statistics(tmp_path, cifar_root):
    """The AuxNet configuration: before each measurement the stages' BatchNorm statistics
    are re-estimated on the composed forward of NORM_BATCHES training batches (16 steps
    trained, 10 counted) and kept in the checkpoint, so `hpcaux eval` counts what the run did."""
    _, summary, _, out = _lp_run(tmp_path, cifar_root, 2, "data.train_subset=256", "train.epochs=1",
                                 "train.batch_size=16", "data.eval_subset=200", "data.test_subset=500",
                                 "parallel.cuts=[4]")
    for k in range(2):
        stage = torch.load(out / "ckpt" / "final" / f"stage_{k}.pt", weights_only=False)["stage"]
        counts = {v.item() for name, v in stage.items() if name.endswith("num_batches_tracked")}
        assert counts == {NORM_BATCHES}, (k, counts)
    proc = check(mpirun(1, [HPCAUX, "eval", str(out), "--subset", "500"], timeout=120))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-9)


def test_short_real_run_learns_and_composed_follows_auxnet_path(tmp_path, cifar_root):
    """The collapse check: without boundary normalisation composed accuracy falls far below
    the AuxNet path (docs/design.md §1); here it must be well above chance and close to it."""
    _, summary, metrics, _ = _lp_run(tmp_path, cifar_root, 2, "data.train_subset=3000", "train.epochs=5",
                                     "data.eval_subset=1000", "data.test_subset=2000", "parallel.cuts=[4]",
                                     timeout=600)
    assert summary["test_acc"] > 0.30, summary
    assert summary["test_acc"] > summary["auxnet_path_acc"] - 0.08, summary
    assert metrics[-1]["rel_gap"][0] < 0.2, metrics[-1]
    assert summary["aux_fraction_of_stage"] < 0.5, summary


def test_world_size_not_k_times_d_is_a_clear_error(tmp_path, cifar_root):
    proc = mpirun(3, [HPCAUX, "train", "--config", str(ROOT / "configs" / "cifar10_resnet20_auxnet.yaml"),
                      "--out", str(tmp_path / "run"), f"data.root={cifar_root}",
                      f"comm.backend={installed_backends()[0]}"], timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("hpcaux: error: world size 3 is not parallel.K x parallel.D = 2 x 1 = 2") == 1


@pytest.mark.skipif("horovod" not in installed_backends(), reason="Horovod is not installed")
def test_training_under_horovodrun_gloo(tmp_path, cifar_root):
    """No MPI world: Horovod collectives over gloo, send/recv over a gloo group, per-rank HDF5 files."""
    from conftest import run

    out = tmp_path / "run"
    proc = check(run(["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", HPCAUX, "train", "--config",
                      str(ROOT / "configs" / "cifar10_resnet20_auxnet.yaml"), "--out", str(out), f"data.root={cifar_root}",
                      "comm.backend=horovod", "data.train_subset=128", "train.batch_size=32", "train.epochs=1",
                      "data.eval_subset=100", "data.test_subset=200", "train.progress=false"], timeout=300))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "horovod" and summary["store_mode"] == "per_rank"
    assert (out / "aux.rank1.h5").exists() and '"test_acc"' in proc.stdout


@pytest.mark.parametrize("np", [2, 3])
def test_partition_is_agreed_and_timed_side_by_side(np):
    out = _check_script(np, "check_balance.py", installed_backends()[0])
    for how in ("balanced by time side by side", "balanced by flops", "configured"):
        assert f"({how}): stages take" in out, out
