"""Collective checks for one backend under mpirun -np N: python check_comm.py BACKEND."""
import sys

import torch

from common import make_comm, native_threads

if sys.argv[1] == "torch":
    from mpi4py import MPI  # noqa: F401  (the torch backend's rendezvous starts MPI and its threads)
torch.set_num_threads(1)
threads_before = native_threads()
comm = make_comm(sys.argv[1])
r, n = comm.rank, comm.size

# allreduce sum/mean of a list of differently shaped tensors, as one collective
a, b = torch.full((3,), float(r)), torch.arange(4.0).reshape(2, 2) * (r + 1)
comm.allreduce([a, b], op="sum")
assert torch.equal(a, torch.full((3,), float(sum(range(n))))), a
assert torch.equal(b, torch.arange(4.0).reshape(2, 2) * sum(range(1, n + 1))), b
c = torch.tensor([float(r)])
comm.allreduce([c], op="mean")
assert torch.allclose(c, torch.tensor([(n - 1) / 2])), c

# process sets: even and odd ranks reduce separately (every rank creates both, in order)
groups = [comm.new_group([q for q in range(n) if q % 2 == parity]) for parity in (0, 1)]
mine = groups[r % 2]
d = torch.tensor([float(r)])
comm.allreduce([d], op="sum", group=mine)
assert d.item() == sum(mine.ranks), (d, mine.ranks)

# broadcast from a non-zero root, and of a Python object
e = torch.tensor([float(r), 7.0])
comm.broadcast([e], root=n - 1)
assert torch.equal(e, torch.tensor([float(n - 1), 7.0])), e
obj = comm.broadcast_object({"cuts": [4], "from": r} if r == 1 else None, root=1)
assert obj == {"cuts": [4], "from": 1}, obj

# point-to-point ring: rank r sends to r+1 and receives from r-1
out, got = torch.full((5,), float(r)), torch.empty(5)
if r % 2 == 0:
    comm.send(out, (r + 1) % n)
    comm.recv(got, (r - 1) % n)
else:
    comm.recv(got, (r - 1) % n)
    comm.send(out, (r + 1) % n)
assert torch.equal(got, torch.full((5,), float((r - 1) % n))), got

# non-blocking: both directions of the ring posted at once, a receive posted before its
# send exists, two messages in flight on one pair arriving in order; nothing waits until wait()
later = [torch.empty(3), torch.empty(3)]
receives = [comm.irecv(buf, (r - 1) % n) for buf in later]
sends = [comm.isend(torch.full((3,), float(r * 10 + i)), (r + 1) % n) for i in range(2)]
back = comm.irecv(torch.empty(2), (r + 1) % n)
sends.append(comm.isend(torch.full((2,), -float(r)), (r - 1) % n))
for i, pending in enumerate(receives):
    assert torch.equal(pending.wait(), torch.full((3,), float(((r - 1) % n) * 10 + i))), later
assert torch.equal(back.wait(), torch.full((2,), -float((r + 1) % n)))
for pending in sends:
    pending.wait()
comm.barrier()
comm.finalize()
if comm.name == "torch":
    # gloo's workers must be joined by finalize, not left to the interpreter's shutdown
    assert native_threads() <= threads_before, f"rank {r}: {native_threads()} native threads after finalize, {threads_before} before"
print(f"rank {r}: comm checks passed ({comm.name}, {n} ranks)")
