"""Real inputs through the HDF5 store under mpirun -np 2:  python check_stored_real.py BACKEND DATA_ROOT RUN_DIR

Two epochs of lp.real_inputs=stored through the trainer's own loop,
with what each stage writes to and reads from the store recorded:
* epoch 1: stage 2 finds nothing stored and trains on the AuxNet alone, while stage 1
  writes its output of every sample it trains on (to real_0);
* epoch 2: stage 2's real input for each sample of its batch is exactly what stage 1
  wrote for that sample in epoch 1, with the sample's label, and stage 1 writes real_1;
* afterwards aux.h5 holds, in each buffer, stage 1's boundary-normalised outputs (mean 0,
  variance 1 per sample) of exactly the samples it trained on that epoch, and NaN in the
  rows of the samples the epoch dropped with its last partial batch.
"""
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

from common import make_comm, tiny_config
from hpcaux.train.layer_parallel import LayerParallelTrainer

backend, data_root, run_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
comm = make_comm(backend)
cfg = tiny_config(data_root, backend, 2, 1, "lp.real_inputs=stored", "train.epochs=2",
                  "data.train_subset=120", "store.probe_size=0")  # 7 batches of 16: 8 samples dropped per epoch
trainer = LayerParallelTrainer(cfg, run_dir, comm, torch.device("cpu"))
stored = trainer.step.stored_real
written, read = {0: {}, 1: {}}, {0: [], 1: []}
write, read_rows = stored.write, stored.read


def recording_write(rows, outputs):
    written[stored.parity].update({int(i): o.detach().clone() for i, o in zip(rows, outputs)})
    write(rows, outputs)


def recording_read(idx, labels):
    found = read_rows(idx, labels)
    read[stored.parity].append((idx.clone(), None if found is None else (found.rows.clone(), found.tensor.clone(),
                                                                         found.labels.clone())))
    return found


stored.write, stored.read = recording_write, recording_read
trainer.run()
if trainer.layout.is_first:
    torch.save(written, run_dir / "written.pt")
comm.barrier()
if trainer.layout.is_last:
    assert len(read[0]) == 7 and all(found is None for _, found in read[0]), "epoch 1 found stored real inputs"
    epoch1 = torch.load(run_dir / "written.pt")[0]
    assert len(read[1]) == 7 and len(epoch1) == 7 * 16
    for idx, (rows, tensor, labels) in read[1]:
        assert set(rows.tolist()) == set(idx.tolist()) & set(epoch1), "the batch's samples stored in epoch 1"
        assert torch.equal(labels, trainer.data.train_y[rows]), "labels of the stored inputs"
        for i, t in zip(rows.tolist(), tensor):
            assert torch.equal(t, epoch1[i]), f"sample {i}: the stored input is not stage 1's output of epoch 1"
comm.barrier()
if trainer.layout.is_first:
    written = torch.load(run_dir / "written.pt")
    with h5py.File(run_dir / "aux.h5", "r") as f:
        for parity in (0, 1):
            rows = f[f"boundary_0/real_{parity}"][:]
            finite = np.isfinite(rows.reshape(len(rows), -1)).all(1)
            assert set(np.flatnonzero(finite).tolist()) == set(written[parity]), f"real_{parity}: rows written"
            assert np.isnan(rows[~finite]).all(), f"real_{parity}: an unwritten row is not NaN"
            for i, out in written[parity].items():
                assert np.array_equal(rows[i], out.numpy()), f"real_{parity}: sample {i} differs from stage 1's output"
            per_sample = rows[finite].reshape(int(finite.sum()), -1)
            assert np.allclose(per_sample.mean(1), 0, atol=1e-4) and np.allclose(per_sample.var(1), 1, atol=1e-2)
    print(f"stored real inputs: epoch 2 reads epoch 1's outputs; {len(written[0])} and {len(written[1])} rows written",
          flush=True)
