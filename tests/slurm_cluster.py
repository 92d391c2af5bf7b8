"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd on localhost.

The daemons run from a private folder with their own slurm.conf (SLURM_CONF points the
client commands at it), so the tests neither need nor disturb a site configuration.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
MUNGE_SOCKET_DIR = Path("/run/munge")

SLURM_CONF = """\
ClusterName=hpcauxtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={port}
SlurmdPort={dport}
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=3600
KillWait=30
JobRequeue=1
NodeName=localhost CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> str | None:
    """Why a cluster cannot be started here (None when it can)."""
    absent = [d for d in DAEMONS + ("/usr/bin/sbatch",) if not Path(d).exists()]
    if absent:
        return f"slurm-wlm/munge not installed ({', '.join(absent)} missing)"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    return None


class LocalSlurm:
    def __init__(self, root: Path, port: int = 6917):
        self.root, self.port = root, port
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._started_munge = None

    def run(self, *cmd, check=True, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    # --- daemons -------------------------------------------------------------------
    def start(self):
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(SLURM_CONF.format(root=self.root, port=self.port, dport=self.port + 1))
        self._start_munge()
        subprocess.run(["/usr/sbin/slurmctld", "-c", "-f", str(self.conf)], env=self.env, check=True)
        subprocess.run(["/usr/sbin/slurmd", "-f", str(self.conf), "-N", "localhost"], env=self.env, check=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM node did not come up (state {state!r}); see {self.root}/slurmd.log")

    def _start_munge(self):
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # a munged is already serving this machine
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"], check=True)
        self._started_munge = True
        for _ in range(50):
            if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("munged did not answer")

    def stop(self):
        for name in ("slurmd", "slurmctld"):
            pid_file = self.root / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)
        if self._started_munge:
            subprocess.run(["pkill", "-u", "munge", "-x", "munged"], check=False)

    # --- jobs ----------------------------------------------------------------------
    def submit(self, *args, cwd=None) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], env=self.env, capture_output=True, text=True,
                             check=True, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        text = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: int, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                       "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(1)
        self.run("scancel", str(job_id), check=False)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout} s: {info}")
