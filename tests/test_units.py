"""Unit tests of the small pure pieces: schedules, the launch environment, per-sample
statistics, the stop point and the shared epoch loop."""
import math
from types import SimpleNamespace

import pytest
import torch

from hpcaux.bench.report import time_to_accuracy
from hpcaux.comm import launch
from hpcaux.train.loop import EpochLoop, LrSchedule, sync_interval
from hpcaux.train.lp.store import SampleStats
from hpcaux.train.run.layout import Layout
from hpcaux.train.run.precision import Precision
from hpcaux.train.run.schedules import learning_rate, rho_at_epoch
from hpcaux.train.run.stop_request import NonFiniteLoss, StopPoint, StoppedBySignal, StopVote

pytestmark = pytest.mark.quick


def optim(**kw):
    base = dict(lr=0.1, warmup_epochs=0, schedule="cosine", gamma=0.1, milestones=[0.5, 0.75])
    return SimpleNamespace(**{**base, **kw})


def test_cosine_starts_at_lr_ends_near_zero_and_halves_midway():
    cfg = optim()
    assert learning_rate(cfg, 0, 100, 10) == pytest.approx(0.1)
    assert learning_rate(cfg, 50, 100, 10) == pytest.approx(0.05)
    assert learning_rate(cfg, 99, 100, 10) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.99)))


def test_warmup_is_linear_then_the_decay_starts_from_lr():
    cfg = optim(warmup_epochs=2)
    assert [learning_rate(cfg, s, 100, 10) for s in (0, 9, 19)] == pytest.approx([0.005, 0.05, 0.1])
    assert learning_rate(cfg, 20, 100, 10) == pytest.approx(0.1)  # first step after the warm-up
    assert learning_rate(cfg, 60, 100, 10) == pytest.approx(0.05)  # half-way through the decay


def test_step_schedule_multiplies_by_gamma_at_each_milestone():
    cfg = optim(schedule="step")
    assert [learning_rate(cfg, s, 100, 10) for s in (49, 50, 74, 75)] == pytest.approx([0.1, 0.01, 0.01, 0.001])


def test_rho_grows_geometrically_and_is_capped():
    lp = SimpleNamespace(rho0=1.0, rho_growth=2.0, rho_max=5.0)
    assert [rho_at_epoch(lp, e) for e in range(4)] == [1.0, 2.0, 4.0, 5.0]


def test_a_growth_below_one_decays_rho():
    lp = SimpleNamespace(rho0=2.0, rho_growth=0.5, rho_max=10.0)
    assert [rho_at_epoch(lp, e) for e in range(4)] == [2.0, 1.0, 0.5, 0.25]


@pytest.mark.parametrize("env,rank,size,local_rank,local_size", [
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 3, 4, 1, 2),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)"}, 5, 8, 1, 4),
    ({"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, 2, 3, 0, 1),  # torchrun
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, 1, 2, 1, 2),  # MPICH
    ({}, 0, 1, 0, 1),
])
def test_launch_environment_of_every_launcher(monkeypatch, env, rank, size, local_rank, local_size):
    for name in {*launch.RANK_VARS, *launch.SIZE_VARS, *launch.LOCAL_RANK_VARS, *launch.LOCAL_SIZE_VARS}:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert (launch.world_rank(), launch.world_size(), launch.local_rank(), launch.local_size()) == \
        (rank, size, local_rank, local_size)


@pytest.mark.parametrize("env,gpus,index,nccl", [
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 4, 1, True),
    ({"SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NTASKS_PER_NODE": "4(x2)"}, 4, 2, True),
    ({"RANK": "3", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 2, 1, False),  # 4 ranks share 2 GPUs
])
def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch, env, gpus, index, nccl):
    """The GPU a rank takes follows its rank on the node, not its world rank (checked with a
    faked GPU count, as on a multi-GPU node); ranks sharing a GPU talk through gloo."""
    from hpcaux.comm.torch_backend import _own_gpu
    from hpcaux.train.run.runtime import select_device

    for name in {*launch.RANK_VARS, *launch.SIZE_VARS, *launch.LOCAL_RANK_VARS, *launch.LOCAL_SIZE_VARS}:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    device = select_device(launch.local_rank(), "auto")
    assert device == torch.device("cuda", index) and chosen == [device]
    assert _own_gpu(device) == nccl
    assert select_device(launch.local_rank(), "cpu") == torch.device("cpu")


def test_placement_line_counts_the_stage_boundaries_that_cross_nodes():
    four_per_node = Layout(K=2, D=4, rank=0).describe_placement(["a"] * 4 + ["b"] * 4)
    assert four_per_node == "placement on 2 nodes (a: ranks 0-3; b: ranks 4-7); 0 of 4 stage boundaries cross nodes"
    # 3 tasks per node with K = 2: replica 1 (ranks 2, 3) and replica 4 (ranks 8, 9) span two nodes
    three_per_node = Layout(K=2, D=6, rank=0).describe_placement(["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["d"] * 3)
    assert three_per_node.endswith("2 of 6 stage boundaries cross nodes"), three_per_node
    assert Layout(K=3, D=1, rank=0).describe_placement(["a", "b", "a"]) == \
        "placement on 2 nodes (a: ranks 0,2; b: ranks 1); 2 of 2 stage boundaries cross nodes"
    assert [p["replica"] for p in Layout(K=2, D=2, rank=0).placement(["a", "a", "b", "b"])] == [0, 0, 1, 1]


def test_sample_stats_match_torch_over_several_batches():
    values = torch.randn(3, 50, 4, generator=torch.Generator().manual_seed(0)) * 2 + 1
    stats = SampleStats()
    for batch in values:
        stats.add(batch)
    flat = values.flatten().double()
    assert stats.mean() == pytest.approx(flat.mean().item())
    assert stats.std() == pytest.approx(flat.std(unbiased=False).item())
    assert stats.rms() == pytest.approx(flat.pow(2).mean().sqrt().item())
    assert math.isnan(SampleStats().rms()) and math.isnan(SampleStats().std())


def test_stop_inside_an_epoch_saves_there_and_on_its_last_step_after_the_epoch():
    saved = []
    point = StopPoint(lambda epoch, step: saved.append((epoch, step)), steps_per_epoch=10)
    point.after_step(False, 0, 3)
    with pytest.raises(StoppedBySignal) as stopped:
        point.after_step(True, 2, 4)
    assert saved == [(2, 4)] and stopped.value.args[0] == 24
    point.after_step(True, 2, 10)  # the epoch's last step: the epoch is recorded first
    assert saved == [(2, 4)]
    with pytest.raises(StoppedBySignal):
        point.after_epoch(3, last_epoch=5)
    assert saved[-1] == (3, 0)
    point.after_step(True, 4, 10)
    point.after_epoch(5, last_epoch=5)  # the run ends here anyway: no stop checkpoint
    assert saved[-1] == (3, 0)


class _Bar:
    def __init__(self):
        self.updates = []

    def update(self, text):
        self.updates.append(text)


def test_epoch_loop_sets_the_schedule_per_step_and_sums_what_steps_report():
    weights = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([weights], lr=1.0)
    seen_lr, context = [], {}

    def step(x, y, idx):
        seen_lr.append(opt.param_groups[0]["lr"])
        return {"loss": float(x), "count": 1}

    loop = EpochLoop([opt], LrSchedule(optim(warmup_epochs=1), total_steps=6, steps_per_epoch=3), step, _Bar(), context,
                     label="finetune ")
    batches = [(torch.tensor(v), None, None) for v in (1.0, 2.0, 3.0)]
    first = loop.run_epoch(0, batches)
    second = loop.run_epoch(1, batches)
    assert seen_lr == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.075, 0.025])
    assert first.sums == {"loss": 6.0, "count": 3} and first.mean("loss") == 2.0 and second.lr == pytest.approx(0.025)
    assert loop.step == 6 and context["step"] == "finetune 5"


class _Request:
    """A stop request raised by the test at a chosen step (StopRequest's interface)."""
    requested = False

    def vote(self):
        return 1.0 if self.requested else 0.0


def test_epoch_loop_reads_the_host_every_sync_every_steps_and_sums_device_tensors():
    """train.sync_every=4: the bar's text and the stop verdict are read after steps 4 and 8
    and after the epoch's last (10); a stop asked at step 5 lands at the read after step 8;
    tensors the steps return are summed on the device and come out as floats."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    request, saved, reads = _Request(), [], []
    vote = StopVote(request, "cpu")

    def step(x, y, idx):
        request.requested = int(x) == 5
        vote.cast_alone()
        return {"loss": x.double(), "seconds": 0.5}

    bar = _Bar()
    loop = EpochLoop([opt], LrSchedule(optim(), total_steps=20, steps_per_epoch=10), step, bar, {},
                     describe=lambda e, v: reads.append(int(v["loss"])) or "", vote=vote, sync_every=4,
                     stop=StopPoint(lambda e, s: saved.append((e, s)), steps_per_epoch=10))
    with pytest.raises(StoppedBySignal):
        loop.run_epoch(0, [(torch.tensor(v), None, None) for v in range(1, 11)])
    assert reads == [4, 8] and saved == [(0, 8)] and len(bar.updates) == 8
    totals = loop.run_epoch(1, [(torch.tensor(v), None, None) for v in range(11, 21)])
    assert reads == [4, 8, 14, 18] and len(bar.updates) == 18  # steps 11-20: reads after 14, 18 and 20
    assert totals.sums == {"loss": sum(range(11, 21)), "seconds": 5.0} and isinstance(totals.sums["loss"], float)


def test_a_nan_loss_read_late_names_the_steps_it_may_have_come_from():
    """With reads every 4 steps, a NaN at step 6 is seen at the read after step 8 and the
    message gives the steps since the last read; every step read on its own names one."""
    vote = StopVote(None, "cpu", rank=1, world_size=2)

    def step(x, y, idx):
        vote.loss_finite = torch.isfinite(1.0 / (x - 5.0))  # inf at x = 5: step 6
        vote.cast_alone()
        return {}

    context = {}
    loop = EpochLoop([], LrSchedule(optim(), total_steps=16, steps_per_epoch=16), step, _Bar(), context, vote=vote,
                     sync_every=4)
    with pytest.raises(NonFiniteLoss) as bad:
        loop.run_epoch(0, [(torch.tensor(float(v)), None, None) for v in range(16)])
    assert bad.value.args == ([1], 4) and context["step"] == 7
    message = bad.value.describe(context["step"], 16, lambda rank: rank)
    assert message.startswith("the loss became NaN or Inf in epoch 1, one of steps 5-8 of 16, on stage(s) 2;")
    assert NonFiniteLoss([0], 1).describe(7, 16, lambda rank: 0).startswith("the loss became NaN or Inf in epoch 1, step 8 of 16")


def test_sync_every_reads_every_step_on_cpus_and_every_50_on_gpus_unless_set():
    assert sync_interval(SimpleNamespace(sync_every=0), torch.device("cpu")) == 1
    assert sync_interval(SimpleNamespace(sync_every=0), torch.device("cuda", 0)) == 50
    assert sync_interval(SimpleNamespace(sync_every=7), torch.device("cpu")) == 7


def test_precision_runs_the_forward_in_bf16_and_channels_last_and_hands_back_float32():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append((i[0].is_contiguous(memory_format=torch.channels_last),
                                                             o.dtype)))
    precision = Precision(SimpleNamespace(precision="bf16", channels_last=True), "cpu")
    precision.prepare(conv, None)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    out = precision.forward(conv, torch.randn(2, 3, 8, 8))
    assert seen == [(True, torch.bfloat16)] and out.dtype == torch.float32 and out.is_contiguous()
    plain = Precision(SimpleNamespace(precision="fp32", channels_last=False), "cpu")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(plain.forward(conv, x), conv(x)) and seen[-1] == (False, torch.float32)
    assert precision.summary() == {"precision": "bf16", "channels_last": True}
    with precision.float32():
        precision.forward(conv, x)
    assert seen[-1] == (True, torch.float32) and precision.bf16


def test_graphs_in_flight_follow_the_delay_of_the_returned_gradient():
    from hpcaux.train.lp.exchange import graphs_in_flight

    # the pipeline without an AuxNet: stage k's gradient returns 2 (K-1-k) micro-batches later
    assert [graphs_in_flight(2, s, True, "fused") for s in range(2)] == [2, 0]
    assert [graphs_in_flight(4, s, True, "fused") for s in range(4)] == [6, 4, 2, 0]
    assert [graphs_in_flight(4, s, False, "keep") for s in range(4)] == [2, 2, 2, 0]  # beside an AuxNet


def test_time_to_accuracy_is_the_first_epoch_reaching_the_target():
    curve = [[10.0, 0.4], [20.0, 0.61], [30.0, 0.59], [40.0, 0.7]]
    assert time_to_accuracy(curve, 0.6) == 20.0
    assert time_to_accuracy(curve, 0.7) == 40.0
    assert time_to_accuracy(curve, 0.71) is None


def test_weight_prediction_runs_the_kept_forward_where_the_delayed_gradient_lands():
    """lp.weight_prediction=N: the stash's copies are w - N x lr x momentum buffer, the
    weights N more momentum steps reach; their gradients go to the real parameters. Before
    the first step (no buffer yet) the copies are the weights themselves."""
    from hpcaux.train.lp.weight_stash import WeightStash

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 3)
    assert torch.equal(WeightStash(layer, optimizer=opt, steps_ahead=2).copies[0]["weight"], layer.weight)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
    stash = WeightStash(layer, optimizer=opt, steps_ahead=2)
    for name, p in layer.named_parameters():
        expected = p.detach() - 2 * 0.1 * opt.state[p]["momentum_buffer"]
        assert torch.allclose(stash.copies[0][name], expected) and not torch.equal(stash.copies[0][name], p)
    predicted = torch.nn.Linear(3, 2)
    predicted.load_state_dict({n: c.detach() for n, c in stash.copies[0].items()})
    out = stash.run(0, x)
    assert torch.allclose(out, predicted(x))
    layer.zero_grad(set_to_none=True)
    out.square().sum().backward()
    stash.move_gradients()
    predicted(x).square().sum().backward()
    assert torch.allclose(layer.weight.grad, predicted.weight.grad)


def test_the_real_input_terms_multiplier_is_the_augmented_lagrangians():
    """lp.loss al_real: the real-input term of a middle stage is rho/2 |r|^2 + <lambda, r>
    (means over elements) on r = F_k(real) - A_k(x), its gradient rho r + lambda over the
    element count, and the AL step lambda + rho r is what stops that gradient moving once
    the gap is closed; without a target there is no multiplier to carry."""
    from hpcaux.train.lp.losses import al_update, real_input_term
    torch.manual_seed(0)
    out = torch.randn(4, 3, 2, 2, requires_grad=True)
    target, lam, rho = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), 0.7
    term = real_input_term(out, torch.zeros(4, dtype=torch.long), is_last=False, target=target, rho=rho, multiplier=lam)
    grad, = torch.autograd.grad(term.loss, out)
    residual = out.detach() - target
    assert torch.allclose(grad, (rho * residual + lam) / out.numel())
    assert torch.equal(term.residual, residual) and set(term.parts) == {"real_penalty", "real_multiplier"}
    assert torch.allclose(al_update(lam, term.residual, rho), lam + rho * residual)
    plain = real_input_term(out, torch.zeros(4, dtype=torch.long), is_last=False, rho=rho, multiplier=lam)
    assert plain.residual is None and not plain.parts
