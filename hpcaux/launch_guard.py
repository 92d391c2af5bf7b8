"""`hpcaux launch LAUNCHER ...`: run mpirun (or srun, horovodrun) so that a stop signal
sent to the job ends it the way a stop should: every rank saves and the job exits 0.

Open MPI's mpirun treats SIGTERM and SIGINT as an abort: it passes SIGTERM to the ranks,
kills them one second later (`odls_base_sigkill_timeout`) and exits 1; a second signal
kills them at once. The ranks need one step and one checkpoint to stop cleanly, so a TERM
from a user, a script or a scheduler's process tree lost the work since the last epoch.
mpirun forwards SIGUSR1 untouched, and the ranks treat SIGUSR1 and SIGTERM alike
(docs/design.md §5). This guard starts the launcher in its own session (a Ctrl-C in the
terminal reaches the guard, not mpirun) and turns every TERM, INT, HUP or USR1 it gets
into SIGUSR1 for the launcher. A repeated signal is forwarded again, which the ranks
ignore, and one that comes once the launcher has ended is ignored by the guard itself;
`kill -9` of the launcher (its pid is printed) ends the job at once.

The launcher starts with SIGUSR1 ignored. mpirun installs its forwarding handler over
that, and on its way out puts back what it found: ignored, not the default action, under
which a repeat that landed in mpirun's last milliseconds killed it (exit 138) after every
rank had saved.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys

from hpcaux.errors import UserError

GUARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def run_guarded(command: list[str]) -> int:
    """Run `command` (a launcher and its arguments) to its end; its exit status."""
    if not command:
        raise UserError("launch: give the launcher command, e.g. hpcaux launch mpirun -np 2 hpcaux train ...")
    if shutil.which(command[0]) is None:
        raise UserError(f"launch: {command[0]} not found on PATH")
    launcher: list[subprocess.Popen] = []
    received: list[str] = []

    def forward(signum, _frame):
        received.append(signal.Signals(signum).name)
        if launcher:
            _ask_to_stop(launcher[0], command[0], received)

    for signum in GUARDED:
        signal.signal(signum, forward)
    try:
        launcher.append(subprocess.Popen(command, start_new_session=True, preexec_fn=_ignore_usr1))
        if received:  # a signal that came while the launcher was being started
            _ask_to_stop(launcher[0], command[0], received)
        status = launcher[0].wait()
    finally:
        # Ignored, not restored, up to the exit: a repeat that lands after the launcher
        # ended must not turn the job's clean end into "killed by SIGTERM".
        for signum in GUARDED:
            signal.signal(signum, signal.SIG_IGN)
    return status if status >= 0 else 128 - status


def _ignore_usr1():
    """In the launcher's process before exec: an ignored signal stays ignored across exec."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _ask_to_stop(proc: subprocess.Popen, name: str, received: list[str]):
    if len(received) == 1:
        print(f"hpcaux launch: {received[0]}: asking every rank to save and stop (SIGUSR1 to {name}, pid "
              f"{proc.pid}); a repeated signal changes nothing, kill -9 {proc.pid} ends the job at once",
              file=sys.stderr, flush=True)
    try:
        proc.send_signal(signal.SIGUSR1)
    except ProcessLookupError:  # it has just ended
        pass
