"""The pipeline without an AuxNet (lp.aux_source=none) at K stages, under mpirun -np K:
python check_chained.py BACKEND DATA_ROOT RUN_DIR MODE M   (MODE: fused or keep; M: parallel.microbatches)

Each step's batch is M micro-batches, each one step u of the exchange (u = M s + m). Stage
k runs micro-batch j at exchange step j+k and applies the gradient for it at exchange step
j+k+2(K-1-k). So the gradient stage k holds after step s must be the mean, over the M
exchange steps u of step s, of the gradient of the last stage's cross-entropy on
micro-batch j = u-k-2(K-1-k) through the network composed of every stage m at the weights
of the step that held exchange step j+m. That is recomputed here on one process from
per-step copies of every stage, and compared with what each rank's step left in .grad. A
stop after the last step checked settles without a hang and saves, per stage, one kept
graph per step of its delay, on one weight version per optimiser step those graphs span
(test_faults checks that the resume is exact).
"""
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from common import make_comm, tiny_config
from hpcaux.train.layer_parallel import LayerParallelTrainer

backend, data_root, run_dir, mode, M = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
comm = make_comm(backend)
K = comm.size
cfg = tiny_config(data_root, backend, K, 1, "lp.aux_source=none", "lp.real_inputs=only", f"lp.delayed_grad={mode}",
                  "lp.local_cls_weight=0", "data.train_subset=512", f"parallel.microbatches={M}")  # 32 steps: none near the epoch end
trainer = LayerParallelTrainer(cfg, run_dir, comm, torch.device("cpu"))
k, exchange = trainer.layout.stage, trainer.step.exchange
STEPS = 2 * K + 3  # the first stage applies gradients from exchange step 2(K-1) on


def delay(stage: int) -> int:
    return 2 * (K - 1 - stage)


record = {"snapshots": [], "grads": {}, "batches": []}
exchange.start_epoch(0)
for s, (x, y, idx) in enumerate(trainer.batches(0, augment=True)):
    if s == STEPS:
        break
    record["batches"].append((x, y))
    record["snapshots"].append(copy.deepcopy(trainer.parts.stage))  # the weights before step s
    trainer.step.compute_gradients(x, y, idx, 1.0)
    grads = [p.grad for p in trainer.parts.stage.parameters()]
    record["grads"][s] = None if any(g is None for g in grads) else [g.clone() for g in grads]
    trainer.parts.stage_opt.step()

state = exchange.settle(trainer.step.real_input_gradient)  # a stop after step STEPS-1
due = [item["due"] for item in state["kept"]]
if k < K - 1:
    assert due == list(range(M * STEPS, M * STEPS + delay(k))), f"stage {k + 1}: kept graphs due at {due}"
    assert all(item["version"] is not None for item in state["kept"]), "a kept graph without its weights"
    # One weight version per step the kept graphs come from, not one per kept graph
    # (PipeDream-2BW: at most two once M >= 2(K-1)).
    steps_kept = {(M * STEPS - 1 - t) // M for t in range(delay(k))}
    assert len(state["versions"]) == len(steps_kept), f"stage {k + 1}: {len(state['versions'])} weight versions"
    print(f"stage {k + 1}: {delay(k)} kept graphs on {len(state['versions'])} weight versions")
    assert (state["kept"][0]["grad"] is not None) == (delay(k) > 0), "the gradient due next step did not arrive"
assert (state["real"] is not None) == (k > 0), f"stage {k + 1}: real input in flight: {state['real'] is not None}"
torch.save(record, run_dir / f"record_{k}.pt")
comm.barrier()

if k == 0:
    records = [torch.load(run_dir / f"record_{m}.pt", weights_only=False) for m in range(K)]
    micro = [(x, y) for batch in records[0]["batches"] for x, y in zip(batch[0].chunk(M), batch[1].chunk(M))]

    def micro_gradient(stage: int, j: int) -> list:
        """Stage `stage`'s gradient of the cross-entropy on micro-batch j, every stage m at
        the weights of the step that held exchange step j+m."""
        nets = [records[m]["snapshots"][(j + m) // M] for m in range(K)]
        for net in nets:
            net.zero_grad()
        h = micro[j][0]
        for m, net in enumerate(nets):
            h = net(h.detach() if m == stage else h)  # from stage `stage` on
        F.cross_entropy(h, micro[j][1]).backward()
        return [p.grad.clone() for p in nets[stage].parameters()]

    checked = 0
    for stage in range(K):
        for s in range(STEPS):
            due = [j for j in (M * s + m - stage - delay(stage) for m in range(M)) if j >= 0]
            got = records[stage]["grads"][s]
            if not due:
                assert got is None or all(not g.any() for g in got), \
                    f"stage {stage + 1} has a gradient at step {s}, before any can return"
                continue
            parts = [micro_gradient(stage, j) for j in due]
            for i, g in enumerate(got):
                want = sum(part[i] for part in parts) / M
                assert torch.allclose(g, want, rtol=1e-4, atol=1e-6), \
                    f"stage {stage + 1}, step {s} (micro-batches {due}): parameter {i} differs by {(g - want).abs().max():.3e}"
            checked += 1
    print(f"chained pipeline ({mode}, K={K}, M={M}): {checked} stage gradients equal the delayed composed network's")
trainer.store.close(comm.barrier)
comm.finalize()
