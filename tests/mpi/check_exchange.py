"""The neighbour exchange under mpirun -np 2:  python check_exchange.py BACKEND DATA_ROOT RUN_DIR MODE

MODE is keep or fused (lp.real_inputs=beside), or auxless: fused with
lp.real_inputs=only and no AuxNet (lp.aux_source=none), where the last stage trains on
nothing at step 0. Over the first steps of an epoch:
* stage 2's real input at step s is exactly stage 1's output on batch s-1, with batch
  s-1's labels (none at step 0);
* the gradient stage 1 applies at step s is exactly the one stage 2 returned for batch
  s-2 (none at steps 0 and 1);
* stage 1's parameter gradient at step s is that of its own term on batch s plus the
  returned gradient back-propagated through its stage at the weights of step s-2 (keep),
  computed here on copies; with fused, its own term on batch s-2
  and the returned gradient, both at the weights of step s-2 (none at steps 0 and 1);
* a stop in the middle of the epoch settles the exchange without a hang: stage 2 keeps
  stage 1's last output and (with the AuxNet) returns its gradient at once (BatchNorm
  statistics untouched); stage 1 settles its last two batches, or without the AuxNet saves
  what rebuilds their graphs (test_faults checks that the resume is exact); so does a
  second stop one step after resuming from that state.
"""
import copy
import sys
from pathlib import Path

import torch

from common import make_comm, record_exchange, tiny_config
from hpcaux.train.layer_parallel import LayerParallelTrainer
from hpcaux.train.lp.losses import stage_term

backend, data_root, run_dir, mode = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
comm = make_comm(backend)
delayed_mode = "fused" if mode == "auxless" else mode
inputs = ["lp.real_inputs=only", "lp.aux_source=none"] if mode == "auxless" else ["lp.real_inputs=beside"]
cfg = tiny_config(data_root, backend, 2, 1, *inputs, f"lp.delayed_grad={delayed_mode}", "train.batch_size=32",
                  "data.train_subset=512")
trainer = LayerParallelTrainer(cfg, run_dir, comm, torch.device("cpu"))
step, exchange, stage = trainer.step, trainer.step.exchange, trainer.parts.stage
rho, first, STEPS = 1.0, 0, 5
record = record_exchange(exchange)  # what crosses ranks, by the step it happens at


def own_term(snapshot, batch):
    stage_copy, head, target = snapshot
    out = stage_copy(batch[0])
    return out, stage_term(out, target, batch[1], is_last=False, rho=rho, local_head=head,
                           local_weight=cfg.lp.local_cls_weight).loss


def expected_stage_gradient(s):
    """Stage 1's gradient at step s, recomputed on the copies taken before each step:
    keep: own term of batch s (weights of step s) + the returned gradient through the
    weights of step s-2; fused: both at the weights of step s-2."""
    if delayed_mode == "fused":
        then = snapshots[s - 2][0]
        out, loss = own_term(snapshots[s - 2], batches[s - 2])
        torch.autograd.backward([loss, out], [None, record["applied"][s]])
        return [p.grad for p in then.parameters()]
    now = snapshots[s][0]
    own_term(snapshots[s], batches[s])[1].backward()
    then = snapshots[s - 2][0]
    then.zero_grad()
    then(batches[s - 2][0]).backward(record["applied"][s])
    return [own.grad + delayed.grad for own, delayed in zip(now.parameters(), then.parameters())]


exchange.start_epoch(first)
snapshots, batches = {}, []
for s, (x, y, idx) in enumerate(trainer.batches(0, augment=True)):
    if s == STEPS:
        after_stop = (x, y, idx)
        break
    batches.append((x, y))
    if trainer.layout.is_first:  # copies of stage 1 and its local head before the step
        with torch.no_grad():
            target = trainer.parts.auxnet(x, [0])[0] if trainer.parts.auxnet else None
        snapshots[s] = (copy.deepcopy(stage), copy.deepcopy(trainer.parts.local_head), target)
    outputs = step.compute_gradients(x, y, idx, rho)
    if trainer.layout.is_first and s < 2 and delayed_mode == "fused":
        assert all(p.grad is None for p in stage.parameters()), f"step {s}: fused mode has nothing due yet"
    elif trainer.layout.is_last and s == 0 and mode == "auxless":
        assert all(p.grad is None for p in stage.parameters()), "step 0: without an AuxNet stage 2 has no input yet"
    elif trainer.layout.is_first and s >= 2:
        expected = expected_stage_gradient(s)
        for p, want in zip(stage.parameters(), expected):
            assert torch.allclose(p.grad, want, rtol=1e-4, atol=1e-6), \
                f"step {s}: stage 1 gradient differs by {(p.grad - want).abs().max().item():.3e}"
    trainer.parts.stage_opt.step()
    if trainer.parts.aux_opt:
        trainer.parts.aux_opt.step()
buffers = [b.clone() for b in stage.buffers()]
state = exchange.settle(step.real_input_gradient)  # a stop after step STEPS-1, inside the epoch
assert all(torch.equal(b, saved) for b, saved in zip(stage.buffers(), buffers)), "settling moved BatchNorm statistics"
pending = state["kept"] if mode == "auxless" else state["delayed"]
if trainer.layout.is_last:
    assert state["real"]["returned"] == (mode != "auxless") and not pending, state
    record["settled_real"] = state["real"]["tensor"]
else:
    assert state["real"] is None and [d["due"] for d in pending] == [STEPS, STEPS + 1], state
    kind = "version" if mode == "auxless" else "parameter_grads"
    assert all(d.get(kind) is not None for d in pending), pending

# A second stop one step after the resume: what the first stop left for step STEPS+1 is
# saved again beside what step STEPS kept, without a hang.
exchange.start_epoch(STEPS, state)
step.compute_gradients(*after_stop, rho)
trainer.parts.stage_opt.step()
again = exchange.settle(step.real_input_gradient)
if not trainer.layout.is_last:
    pending = again["kept"] if mode == "auxless" else again["delayed"]
    assert [d["due"] for d in pending] == [STEPS + 1, STEPS + 2], again

torch.save({k: v for k, v in record.items()}, run_dir / f"record_{comm.rank}.pt")
comm.barrier()
if comm.rank == 0:
    mine, theirs = record, torch.load(run_dir / "record_1.pt")
    assert theirs["real"][0] is None and mine["applied"][0] is None and mine["applied"][1] is None
    for s in range(1, STEPS):
        got, labels = theirs["real"][s]
        assert torch.equal(got, mine["sent"][s - 1]), f"real input at step {s} is not stage 1's output on batch {s - 1}"
        assert torch.equal(labels, batches[s - 1][1]), f"labels at step {s} are not batch {s - 1}'s"
    for s in range(2, STEPS):
        assert torch.equal(mine["applied"][s], theirs["returned"][s - 1]), f"gradient applied at step {s} differs"
    assert torch.equal(theirs["settled_real"], mine["sent"][STEPS - 1]), "the settled real input is not the last output"
    print(f"exchange ({mode}): real inputs one step late, gradients two steps late, stage gradients match")
trainer.store.close(comm.barrier)
comm.finalize()
