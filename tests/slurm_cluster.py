"""A real SLURM cluster for the tests: munged, slurmctld and one slurmd per node.

One node is this machine (`localhost`); two are the nodes of tests/two_nodes.py, one
slurmd inside each, with slurmctld on the bridge as the login node. The daemons run from
a private folder with their own slurm.conf (SLURM_CONF points the client commands at
it), so the tests neither need nor disturb a site configuration.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from two_nodes import ADDRESSES, HEAD_ADDRESS, NODES, node_command

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
MUNGE_SOCKET_DIR = Path("/run/munge")

SLURM_CONF = """\
ClusterName=hpcauxtest
SlurmctldHost={controller}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
TmpFS={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
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
{node_lines}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
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
    def __init__(self, root: Path, port: int = 6917, two_nodes=None):
        """`two_nodes`: a built tests.two_nodes.TwoNodes to run on (else this machine)."""
        self.root, self.port, self.two_nodes = root, port, two_nodes
        self.nodes = list(NODES) if two_nodes else ["localhost"]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._started_munge = None

    def run(self, *cmd, check=True, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    # --- daemons -------------------------------------------------------------------
    def start(self):
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(SLURM_CONF.format(root=self.root, port=self.port, dport=self.port + 1,
                                               **self._topology()))
        self._start_munge()
        subprocess.run(["/usr/sbin/slurmctld", "-c", "-f", str(self.conf)], env=self.env, check=True)
        for node in self.nodes:
            slurmd = ["/usr/sbin/slurmd", "-f", str(self.conf), "-N", node]
            subprocess.run(node_command(node, slurmd) if self.two_nodes else slurmd, env=self.env, check=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if len(states) == len(self.nodes) and all(s in ("idle", "mixed", "allocated") for s in states):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes did not come up (states {states!r}); see {self.root}/slurmd-*.log")

    def _topology(self) -> dict:
        """slurm.conf's controller and node lines: each node a slurmd at its own address."""
        if not self.two_nodes:
            return {"controller": "localhost", "node_names": "localhost",
                    "node_lines": "NodeName=localhost CPUs=2 State=UNKNOWN"}
        return {"controller": f"localhost({HEAD_ADDRESS})", "node_names": ",".join(self.nodes),
                "node_lines": "\n".join(f"NodeName={n} NodeAddr={ADDRESSES[n]} CPUs=2 State=UNKNOWN"
                                        for n in self.nodes)}

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
        for name in [f"slurmd-{n}" for n in self.nodes] + ["slurmctld"]:
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

    def submit_training(self, runs: Path, *overrides, script="slurm/train.sbatch", options=()) -> int:
        """sbatch `script` with configs/cifar10_resnet20_auxnet.yaml; the run lands in runs/JOBID."""
        runs.mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output folder
        self.env["HPCAUX_RUNS"] = str(runs)
        return self.submit(f"--output={runs}/job-%j.out", *options, script, "configs/cifar10_resnet20_auxnet.yaml",
                           *overrides, cwd=Path(__file__).resolve().parents[1])

    def wait_for_first_checkpoint(self, job: int, run: Path, timeout=240):
        """Block until the job has committed a checkpoint (it is then training on)."""
        deadline = time.monotonic() + timeout
        while not (run / "ckpt" / "latest").exists():
            state = self.job(job)
            assert time.monotonic() < deadline and state["JobState"] in ("PENDING", "RUNNING"), state
            time.sleep(0.5)

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
