"""Composed evaluation across ranks equals the single-process composition of the saved stages:
the same logits (allclose) and the same accuracy.

python check_composed.py BACKEND DATA_ROOT RUN_DIR   (under mpirun -np K)
"""
import sys
from pathlib import Path

import torch

from common import make_comm, tiny_config, world_size
from hpcaux.store.checkpoint import latest_checkpoint
from hpcaux.train.layer_parallel import LayerParallelTrainer
from hpcaux.train.reevaluate import evaluate_run, load_composed_model

backend, data_root, run_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
comm = make_comm(backend)
cfg = tiny_config(data_root, backend, world_size(), 1, "data.train_subset=512", "train.batch_size=32")
trainer = LayerParallelTrainer(cfg, run_dir, comm, torch.device("cpu"))
for i, (x, y, idx) in enumerate(trainer.batches(0, augment=True)):
    trainer.step(x, y, idx, rho=1.0)
    if i == 5:
        break
across_ranks = trainer.metrics(subset=400, split="test")["composed_acc"]
trainer.parts.stage.eval()
with torch.no_grad():
    logits = [trainer.chain.forward(x)[1] for x, _ in trainer.metrics.eval_batches("test", 400)]
if trainer.layout.is_last:
    torch.save(torch.cat(logits), run_dir / "logits_across_ranks.pt")
trainer.saver.save("final", 0, "done")  # ends with a barrier: the logits file is complete
if comm.rank == 0:
    in_one_process = evaluate_run(run_dir, subset=400)["test_acc"]
    assert abs(across_ranks - in_one_process) < 1e-12, (across_ranks, in_one_process)
    folder, manifest = latest_checkpoint(run_dir)
    model = load_composed_model(folder, manifest, trainer.data.num_classes).eval()
    with torch.no_grad():
        reference = torch.cat([model(x) for x, _ in trainer.metrics.eval_batches("test", 400)])
    pipelined = torch.load(run_dir / "logits_across_ranks.pt")
    assert torch.allclose(pipelined, reference, atol=1e-5), (pipelined - reference).abs().max()
    print(f"composed logits and accuracy {across_ranks:.4f} across ranks == {in_one_process:.4f} in one process")
trainer.store.close(comm.barrier)
comm.finalize()
