"""Rank 1 waits on a message rank 0 never sends: the watchdog must abort the job."""
import sys
import time

import torch

from common import ROOT  # noqa: F401  (puts the package on the path)
from hpcaux.comm import create_comm

comm = create_comm(sys.argv[1], float(sys.argv[2]), torch.device("cpu"))
comm.watchdog.context.update(stage=comm.rank, step=3)
if comm.rank == 0:
    time.sleep(120)
else:
    comm.recv(torch.empty(4), 0, what="recv boundary activation")
