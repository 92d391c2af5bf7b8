"""The AuxNet at every boundary (the relayed exchange) under mpirun -np 3:  python check_relay.py BACKEND DATA_ROOT RUN_DIR MODE

MODE is keep or fused (lp.delayed_grad; lp.real_inputs beside). Over the first steps of
an epoch at K = 3:
* the real inputs form a chain: stage 2's real input at step s is stage 1's output on its
  own real input of step s-1, which was stage 0's output on batch s-2, with batch s-2's
  labels (none before step 2); stage 1 sends nothing before its first real input;
* what stage 1 sends at step s is its stage, at the weights of step s, on that real input;
* every returned gradient is applied two steps after its output was sent, on stage 0 and
  on stage 1 alike, and is exactly the one the next stage returned;
* the gradient stage 1 returns is that of its real-input term, its local classifier
  and the penalty towards the AuxNet's target of that batch (computed at the step the
  batch was drawn);
* stage 1's parameter gradient at step s is its own term on batch s and its real-input
  term at the weights of step s, plus the returned gradient through its real-input
  forward of step s-2 at the weights of that step, all recomputed here on copies;
* a stop settles the chain without a hang, and again one step after resuming from it.
"""
import copy
import sys
from pathlib import Path

import torch

from common import make_comm, record_exchange, tiny_config
from hpcaux.train.layer_parallel import LayerParallelTrainer
from hpcaux.train.lp.losses import real_input_term, stage_term

backend, data_root, run_dir, mode = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
comm = make_comm(backend)
cfg = tiny_config(data_root, backend, 3, 1, "lp.real_inputs=beside", f"lp.delayed_grad={mode}",
                  "train.batch_size=32", "data.train_subset=512")
trainer = LayerParallelTrainer(cfg, run_dir, comm, torch.device("cpu"))
step, exchange, stage, k = trainer.step, trainer.step.exchange, trainer.parts.stage, trainer.layout.stage
rho, STEPS = 1.0, 6
record = record_exchange(exchange)


def real_term(snapshot, real, labels, target):
    stage_copy, head, _ = snapshot
    out = stage_copy(real)
    return out, real_input_term(out, labels, is_last=False, local_head=head, local_weight=cfg.lp.local_cls_weight,
                                target=target, rho=rho).loss


def fresh(snapshot):
    """A copy of a step's snapshot without gradients (each is used at two steps)."""
    copied = copy.deepcopy(snapshot)
    for module in copied:
        module.zero_grad(set_to_none=True)
    return copied


def expected_middle_gradient(s):
    """Stage 1 at step s: own term of batch s and real-input term of batch s-1 at the
    weights of step s, the returned gradient through the real-input forward of step s-2
    (nothing is held back in fused mode: a relaying stage's kept graph is that forward)."""
    now, then = fresh(snapshots[s]), fresh(snapshots[s - 2])
    x, y = batches[s]
    with torch.no_grad():
        preds = now[2](x, [0, 1])
    own = stage_term(now[0](preds[0]), preds[1], y, is_last=False, rho=rho, local_head=now[1],
                     local_weight=cfg.lp.local_cls_weight).loss
    real, labels = record["real"][s]
    loss = own + real_term(now, real, labels, targets[s - 1])[1]
    out, _ = real_term(then, record["real"][s - 2][0], record["real"][s - 2][1], targets[s - 3])
    torch.autograd.backward([loss, out], [None, record["applied"][s]])
    return [a.grad + b.grad for a, b in zip(now[0].parameters(), then[0].parameters())]


snapshots, batches, targets = {}, [], {}
exchange.start_epoch(0)
for s, (x, y, idx) in enumerate(trainer.batches(0, augment=True)):
    if s == STEPS:
        after_stop = (x, y, idx)
        break
    batches.append((x, y))
    if k == 1:  # copies of stage 1, its local head and the AuxNet before the step
        snapshots[s] = (copy.deepcopy(stage), copy.deepcopy(trainer.parts.local_head), copy.deepcopy(trainer.parts.auxnet))
        with torch.no_grad():
            targets[s] = copy.deepcopy(trainer.parts.auxnet)(x, [1])[1]
    step.compute_gradients(x, y, idx, rho)
    if k == 1 and s >= 3:
        for p, want in zip(stage.parameters(), expected_middle_gradient(s)):
            assert torch.allclose(p.grad, want, rtol=1e-4, atol=1e-6), \
                f"step {s}: stage 1 gradient differs by {(p.grad - want).abs().max().item():.3e}"
    trainer.parts.stage_opt.step()
    trainer.parts.aux_opt.step()

if k == 1:  # the returned gradient: the real-input term's, with the target of its batch
    for s in range(1, STEPS):
        real, labels = record["real"][s]
        real = real.clone().requires_grad_()
        grad, = torch.autograd.grad(real_term(fresh(snapshots[s]), real, labels, targets[s - 1])[1], real)
        assert torch.allclose(record["returned"][s], grad, rtol=1e-4, atol=1e-7), f"returned gradient {s} differs"
        sent = snapshots[s][0](record["real"][s][0])
        assert torch.allclose(record["sent"][s], sent, rtol=1e-5, atol=1e-6), f"stage 1 sent at {s} not F1(real)"
    assert 0 not in record["sent"], "stage 1 sent an output before its first real input"

state = exchange.settle(step.real_input_gradient)  # a stop after step STEPS-1, inside the epoch
if k < 2:
    assert [d["due"] for d in state["delayed"]] == [STEPS, STEPS + 1], state
    assert all(d["parameter_grads"] is not None for d in state["delayed"])
else:
    assert state["real"]["returned"] and not state["delayed"], state
exchange.start_epoch(STEPS, state)
step.compute_gradients(*after_stop, rho)
trainer.parts.stage_opt.step()
again = exchange.settle(step.real_input_gradient)
if k < 2:
    assert [d["due"] for d in again["delayed"]] == [STEPS + 1, STEPS + 2], again

torch.save(record, run_dir / f"record_{comm.rank}.pt")
comm.barrier()
if comm.rank == 0:
    stages = [torch.load(run_dir / f"record_{r}.pt") for r in range(3)]
    first, middle, last = stages
    assert middle["real"][0] is None and all(last["real"][s] is None for s in (0, 1))
    for s in range(1, STEPS):
        assert torch.equal(middle["real"][s][0], first["sent"][s - 1]), f"stage 1's real input at {s}"
        assert torch.equal(middle["real"][s][1], batches[s - 1][1])
    for s in range(2, STEPS):
        assert torch.equal(last["real"][s][0], middle["sent"][s - 1]), f"stage 2's real input at {s}"
        assert torch.equal(last["real"][s][1], batches[s - 2][1]), f"stage 2's labels at {s} are not batch {s - 2}'s"
    for s in range(2, STEPS):
        assert torch.equal(first["applied"][s], middle["returned"][s - 1]), f"stage 0's gradient at {s}"
    for s in range(3, STEPS):
        assert torch.equal(middle["applied"][s], last["returned"][s - 1]), f"stage 1's gradient at {s}"
    assert all(middle["applied"][s] is None for s in (0, 1, 2)), "stage 1 applied a gradient before one was due"
    print(f"relay ({mode}): real inputs along the chain, every gradient two steps late, stage gradients match")
trainer.store.close(comm.barrier)
comm.finalize()
