"""Hang watchdog: a blocking collective or send/recv that waits too long aborts the job.

One daemon thread per process watches the operation in progress. On expiry it prints one
line naming the rank, its stage/replica/step, the operation and the peers it waits on,
then calls the backend's abort (MPI_Abort where MPI is up) so that the launcher tears the
whole job down. A lost peer therefore ends a job in `timeout_s`, never silently.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time


class Watchdog:
    def __init__(self, rank: int, timeout_s: float, abort):
        self.rank, self.timeout_s, self._abort = rank, timeout_s, abort
        self.context: dict = {}  # stage, replica, step: set by the trainer as it goes
        self._op = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="hpcaux-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def guard(self, operation: str, peers):
        with self._lock:
            self._op = (operation, list(peers), time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._op = None

    def describe(self, operation: str, peers, waited: float) -> str:
        where = ", ".join(f"{k} {v}" for k, v in self.context.items())
        where = f" ({where})" if where else ""
        return (f"hpcaux: watchdog: rank {self.rank}{where} waited {waited:.0f} s on {operation} "
                f"with ranks {peers}; a peer is lost or stuck, aborting the job")

    def _watch(self):
        poll = min(1.0, self.timeout_s / 4)
        while True:
            time.sleep(poll)
            with self._lock:
                op = self._op
            if op is None:
                continue
            operation, peers, started = op
            waited = time.monotonic() - started
            if waited > self.timeout_s:
                print(self.describe(operation, peers, waited), file=sys.stderr, flush=True)
                try:
                    self._abort(3)
                finally:
                    os._exit(3)
