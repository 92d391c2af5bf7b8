"""Two compute "nodes" on this one machine, for the multi-node tests.

Each node is a Linux network namespace with its own address on a private bridge and, for
every process started in it, its own host name (a UTS namespace). The root namespace
plays the login node: mpirun and slurmctld run there.

* Open MPI starts its daemons on the nodes through `rsh_agent`, a stand-in for ssh that
  enters the node's namespaces with an emptied environment, as a login shell on another
  host would. Open MPI therefore treats both nodes as remote: it launches `orted` there,
  carries only what `-x` names, and moves bytes between the nodes over TCP on the bridge
  (shared memory only between ranks of one node).
* SLURM runs one slurmd per node (`node_command` starts it inside the namespaces), so a
  job's batch step runs on the first node and srun spreads tasks over both.

The file system is shared by all nodes, like a cluster's parallel file system. Only root
can build this; `missing()` says why it cannot be built where it cannot.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

BRIDGE = "hxbr0"
SUBNET = "10.77.0"
HEAD_ADDRESS = f"{SUBNET}.1"
NODES = ("hxnode1", "hxnode2")
ADDRESSES = {node: f"{SUBNET}.{11 + i}" for i, node in enumerate(NODES)}
# Open MPI must use the bridge: other interfaces are not reachable from inside a node.
MPI_NETWORK = {"OMPI_MCA_oob_tcp_if_include": f"{SUBNET}.0/24", "OMPI_MCA_btl_tcp_if_include": f"{SUBNET}.0/24"}

RSH_AGENT = """\
#!/bin/sh
# ssh stand-in for Open MPI: rsh_agent HOST COMMAND... runs COMMAND on HOST, a node of
# tests/two_nodes.py, in its namespaces and with the environment a fresh login has.
host=$1; shift
case $host in {cases}
  *) echo "rsh_agent: unknown host $host" >&2; exit 255 ;;
esac
exec env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$HOME" \\
  nsenter --net=/run/netns/$node unshare --uts --mount sh -c "{enter} && exec sh -c \\"\\$0\\"" "$*"
"""


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def missing() -> str | None:
    """Why two nodes cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = "hxprobe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _enter(node) -> str:
    """Shell words that make a fresh UTS and mount namespace into `node`: its host name and
    its /etc/hosts (both nodes by name). Not `ip netns exec`: that remounts /sys, and
    slurmd needs the cgroup file system mounted there."""
    return f"mount --bind /etc/netns/{node}/hosts /etc/hosts && hostname {node}"


def node_command(node: str, command: list[str]) -> list[str]:
    """`command` as it runs on `node`: in the node's network namespace, under its host name."""
    script = f"{_enter(node)} && exec {shlex.join(command)}"
    return ["nsenter", f"--net=/run/netns/{node}", "unshare", "--uts", "--mount", "sh", "-c", script]


class TwoNodes:
    """Builds the bridge, the two namespaces and the ssh stand-in; `remove()` undoes all."""

    def __init__(self, root: Path):
        self.root = root
        self.rsh_agent = root / "rsh_agent"
        self.hostfile = root / "hostfile"

    def build(self):
        self.remove()  # what a killed earlier session may have left
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{HEAD_ADDRESS}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{ADDRESSES[n]} {n}\n" for n in NODES) + f"{HEAD_ADDRESS} hxhead\n"
        for node in NODES:
            _ip("netns", "add", node)
            # mounted over /etc/hosts inside the node (_enter): the nodes know each other by name
            etc = Path("/etc/netns") / node
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)
            outside, inside = f"{node}-br", f"{node}-eth"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", BRIDGE, "up")
            _ip("link", "set", inside, "netns", node)
            _ip("-n", node, "addr", "add", f"{ADDRESSES[node]}/24", "dev", inside)
            _ip("-n", node, "link", "set", inside, "up")
            _ip("-n", node, "link", "set", "lo", "up")
        cases = "".join(f"\n  {n}|{ADDRESSES[n]}) node={n} ;;" for n in NODES)
        self.rsh_agent.write_text(RSH_AGENT.format(cases=cases, enter=_enter("$node")))
        self.rsh_agent.chmod(0o755)
        self.hostfile.write_text("".join(f"{ADDRESSES[n]} slots=2\n" for n in NODES))
        return self

    def mpi_env(self) -> dict:
        """What mpirun needs to launch on the nodes with `--hostfile self.hostfile`."""
        return {"OMPI_MCA_plm_rsh_agent": str(self.rsh_agent), **MPI_NETWORK}

    def remove(self):
        for node in NODES:
            pids = _ip("netns", "pids", node, check=False).stdout.split()
            for pid in pids:  # a process left in a node would keep its namespace alive
                subprocess.run(["kill", "-9", pid], capture_output=True)
            _ip("netns", "del", node, check=False)
            _ip("link", "del", f"{node}-br", check=False)
            shutil.rmtree(Path("/etc/netns") / node, ignore_errors=True)
        _ip("link", "del", BRIDGE, check=False)
