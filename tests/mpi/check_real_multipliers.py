"""AL multipliers on the relayed real-input term (lp.loss al_real) under mpirun -np 3:
    python check_real_multipliers.py BACKEND DATA_ROOT RUN_DIR

At K = 3 with the relayed exchange (fused), over one epoch and the first steps of the next:
* after the epoch, stage 1's lambda_real row of every sample whose real input it trained
  on is rho x (its output on that real input, at the weights of that step, minus the
  AuxNet's target of the batch); the rows of the last batch, whose real input never came
  this epoch, are still zero; stages 0 and 2 hold no such array;
* in the next epoch stage 1's real-input term carries a non-zero multiplier part;
* a stop inside that epoch settles without a hang and the run goes on a step.
"""
import copy
import sys
from pathlib import Path

import torch

from common import make_comm, record_exchange, tiny_config
from hpcaux.store.names import lambda_real_name
from hpcaux.train.layer_parallel import LayerParallelTrainer

backend, data_root, run_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
comm = make_comm(backend)
cfg = tiny_config(data_root, backend, 3, 1, "lp.real_inputs=beside", "lp.delayed_grad=fused",
                  "lp.loss=al_real", "train.batch_size=32", "data.train_subset=256")
trainer = LayerParallelTrainer(cfg, run_dir, comm, torch.device("cpu"))
step, exchange, stage, k = trainer.step, trainer.step.exchange, trainer.parts.stage, trainer.layout.stage
store, rho = trainer.store, 0.5
record = record_exchange(exchange)
assert (lambda_real_name(1) in store.specs) and not any(lambda_real_name(b) in store.specs for b in (0, 2))

snapshots, targets, rows = {}, {}, []
exchange.start_epoch(0)
for s, (x, y, idx) in enumerate(trainer.batches(0, augment=True)):
    rows.append(idx)
    if k == 1:
        snapshots[s] = copy.deepcopy(stage)
        with torch.no_grad():
            targets[s] = copy.deepcopy(trainer.parts.auxnet)(x, [1])[1]
    step(x, y, idx, rho)
exchange.drain()

if k == 1:
    for s in range(1, len(rows)):
        real, _ = record["real"][s]
        with torch.no_grad():
            want = rho * (snapshots[s](real) - targets[s - 1])
        got = store.read_rows(lambda_real_name(1), rows[s - 1])
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), \
            f"multipliers of batch {s - 1} differ by {(got - want).abs().max().item():.3e}"
    assert not store.read_rows(lambda_real_name(1), rows[-1]).any(), "the last batch's rows were written"

exchange.start_epoch(0)
parts = []
for s, (x, y, idx) in enumerate(trainer.batches(1, augment=True)):
    if s == 3:
        after_stop = (x, y, idx)
        break
    parts.append(step(x, y, idx, rho))
if k == 1:
    assert "real_multiplier" not in parts[0] and all(float(p["real_multiplier"]) != 0.0 for p in parts[1:]), parts
state = exchange.settle(step.real_input_gradient)
exchange.start_epoch(3, state)
step(*after_stop, rho)
exchange.settle(step.real_input_gradient)
comm.barrier()
if comm.rank == 0:
    print("al_real: the real-input term's multipliers are rho x its residual, used the next epoch, settled at a stop")
store.close(comm.barrier)
comm.finalize()
