"""The in-process loopback Comm (hpcaux/comm/loopback.py) and the one-process twins that run
on it: the executor driving the gpipe and evaluate timetables along a chain of K stages on
K threads, against backprop of the composed network in one process."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcaux.comm.loopback import run_ranks
from hpcaux.train.lp.composed import StageChain
from hpcaux.train.lp.executor import Executor
from hpcaux.train.lp.schedule import Action, Op
from hpcaux.train.run.layout import Layout

pytestmark = pytest.mark.quick


def test_collectives_sum_in_rank_order_over_the_world_and_a_process_set():
    def work(comm):
        mine = torch.tensor([float(comm.rank + 1), 10.0 ** comm.rank])
        world = comm.allreduce([mine.clone()], op="mean")[0]
        pair = comm.new_group([1, 2])
        in_pair = comm.allreduce([mine.clone()], group=pair)[0] if comm.rank in (1, 2) else None
        shared = comm.broadcast([torch.full((2,), float(comm.rank))], root=2)[0]
        return world, in_pair, shared

    results = run_ranks(3, work)
    for rank, (world, in_pair, shared) in enumerate(results):
        assert torch.equal(world, torch.tensor([2.0, 37.0]))
        assert torch.equal(shared, torch.tensor([2.0, 2.0]))
        assert (in_pair is None) == (rank == 0)
    assert torch.equal(results[1][1], torch.tensor([5.0, 110.0]))


def test_receives_match_sends_in_the_order_they_were_posted_whenever_waited_on():
    def work(comm):
        if comm.rank == 0:
            for value in (1.0, 2.0, 3.0):
                comm.isend(torch.tensor([value]), 1)
            return None
        first, second, third = (comm.irecv(torch.zeros(1), 0) for _ in range(3))
        return [third.wait().item(), first.wait().item(), second.wait().item()]

    assert run_ranks(2, work)[1] == [3.0, 1.0, 2.0]


def test_a_failing_rank_releases_the_others_and_its_error_reaches_the_caller():
    def work(comm):
        if comm.rank == 1:
            raise ValueError("rank 1 broke")
        comm.recv(torch.zeros(1), 1)   # would wait for ever

    with pytest.raises(ValueError, match="rank 1 broke"):
        run_ranks(2, work)


def test_the_executor_names_an_action_its_program_cannot_run_and_a_receive_left_open():
    class OnlyForwards:
        def forward(self, action):
            pass

        def buffer(self, action):
            return torch.zeros(1)

    def work(comm):
        executor = Executor(comm, {})
        with pytest.raises(RuntimeError, match="OnlyForwards cannot run a backward action"):
            executor.run([Action(Op.FORWARD, 0, 0), Action(Op.BACKWARD, 0, 0)], OnlyForwards())
        executor = Executor(comm, {0: 0})
        with pytest.raises(RuntimeError, match="never waited on"):
            executor.run([Action(Op.RECV_POST, 0, 3, 0, "gradient")], OnlyForwards())

    run_ranks(1, work)


def tiny_stages(K: int) -> list[nn.Module]:
    """A small CNN on 8x8 images cut into K stages (BatchNorm included: GPipe normalises
    each micro-batch on its own, and so must the twin)."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(3 if k == 0 else 6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
              for k in range(K - 1)]
    return blocks + [nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(6, 10))]


@pytest.mark.parametrize("K,M", [(2, 1), (3, 2), (4, 4), (3, 5)])
def test_gpipe_step_along_the_chain_gives_one_process_backprop_gradients(K, M):
    """Every stage's gradient (as its optimiser step would see it) and the last stage's loss
    equal those of the composed network's cross-entropy over the same M micro-batches;
    the stop vote gets the loss on the last stage and None elsewhere."""
    stages = tiny_stages(K)
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 10, (10,))

    def work(comm):
        stage = copy.deepcopy(stages[comm.rank])
        chain = StageChain(comm, Layout(K, 1, comm.rank), stage, [(6, 8, 8)] * (K - 1), torch.device("cpu"))
        applied, voted = [], []
        loss = chain.train_step(x, y, F.cross_entropy, M,
                                lambda: applied.append([p.grad.clone() for p in stage.parameters()]), voted.append)
        return loss, applied, voted

    results = run_ranks(K, work)
    composed = nn.Sequential(*copy.deepcopy(stages))
    parts = list(zip(x.tensor_split(M), y.tensor_split(M)))
    reference = sum(F.cross_entropy(composed(xm), ym) * len(ym) / len(y) for xm, ym in parts)
    reference.backward()
    for k, (loss, applied, voted) in enumerate(results):
        assert len(applied) == 1, f"stage {k} stepped {len(applied)} times"
        for mine, theirs in zip(applied[0], composed[k].parameters()):
            torch.testing.assert_close(mine, theirs.grad, rtol=1e-5, atol=1e-6)
        if k == K - 1:
            torch.testing.assert_close(loss, reference.detach())
            assert voted == [loss]
        else:
            assert loss is None and voted == [None]


def test_evaluation_along_the_chain_counts_what_the_composed_network_gets_right():
    K, stages = 3, tiny_stages(3)
    batches = [(torch.randn(n, 3, 8, 8), torch.randint(0, 10, (n,))) for n in (7, 5, 9)]

    def work(comm):
        chain = StageChain(comm, Layout(K, 1, comm.rank), copy.deepcopy(stages[comm.rank]), [(6, 8, 8)] * 2,
                           torch.device("cpu"))
        return chain.correct_count(batches)

    composed = nn.Sequential(*copy.deepcopy(stages)).eval()
    with torch.no_grad():
        expected = sum(int((composed(xb).argmax(1) == yb).sum()) for xb, yb in batches)
    assert run_ranks(K, work) == [(0, 0), (0, 0), (expected, 21)]


def test_norm_statistics_reestimated_along_the_chain_are_those_of_the_composed_forward():
    """Each stage's BatchNorm statistics become the average over the composed network's
    forward of the batches, as one process computes them; the stage's mode and momentum
    are left as they were."""
    K, stages = 3, tiny_stages(3)
    batches = [(torch.randn(n, 3, 8, 8) * 2 + 1, torch.randint(0, 10, (n,))) for n in (7, 5, 9)]

    def work(comm):
        stage = copy.deepcopy(stages[comm.rank]).eval()
        chain = StageChain(comm, Layout(K, 1, comm.rank), stage, [(6, 8, 8)] * 2, torch.device("cpu"))
        chain.reestimate_norm_statistics(batches)
        return stage

    composed = nn.Sequential(*copy.deepcopy(stages))
    norms = [m for m in composed.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        for xb, _ in batches:
            composed(xb)
    reestimated = run_ranks(K, work)
    for k in range(K - 1):
        mine, = [m for m in reestimated[k].modules() if isinstance(m, nn.BatchNorm2d)]
        theirs = composed[k][1]
        assert not mine.training and mine.momentum == 0.1
        assert int(mine.num_batches_tracked) == len(batches)
        torch.testing.assert_close(mine.running_mean, theirs.running_mean)
        torch.testing.assert_close(mine.running_var, theirs.running_var)
        assert not torch.allclose(mine.running_mean, stages[k][1].running_mean)
