"""world = K stages x D replicas: which stage and replica a rank owns, its peers, and where they run."""
from __future__ import annotations

from dataclasses import dataclass

from hpcaux.errors import UserError


@dataclass(frozen=True)
class Layout:
    K: int
    D: int
    rank: int

    @classmethod
    def for_world(cls, K: int, D: int, rank: int, size: int) -> "Layout":
        """The layout of `size` ranks; D = 0 takes as many replicas as the world holds."""
        if D == 0:
            if size % K:
                raise UserError(f"world size {size} is not a multiple of parallel.K = {K}; launch a multiple of {K} ranks")
            D = size // K
        if K * D != size:
            raise UserError(f"world size {size} is not parallel.K x parallel.D = {K} x {D} = {K * D}; "
                            f"launch {K * D} ranks or change parallel.K/parallel.D")
        return cls(K, D, rank)

    @property
    def stage(self) -> int:
        return self.stage_of(self.rank)

    @property
    def replica(self) -> int:
        return self.replica_of(self.rank)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.K - 1

    def stage_of(self, rank: int) -> int:
        return rank % self.K

    def replica_of(self, rank: int) -> int:
        return rank // self.K

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        return (self.replica if replica is None else replica) * self.K + stage

    def stage_ranks(self, stage: int) -> list[int]:
        """The D ranks holding replicas of `stage` (their gradients are averaged)."""
        return [self.rank_of(stage, r) for r in range(self.D)]

    def replica_ranks(self, replica: int) -> list[int]:
        return [self.rank_of(s, replica) for s in range(self.K)]

    def placement(self, hosts: list[str]) -> list[dict]:
        """Rank, host, stage and replica of every rank (summary.json's "placement"), from
        the host name of each rank (Comm.gather_text)."""
        return [{"rank": r, "host": h, "stage": self.stage_of(r), "replica": self.replica_of(r)}
                for r, h in enumerate(hosts)]

    def describe_placement(self, hosts: list[str]) -> str:
        """One line for the job log: which ranks each node holds, and how many stage
        boundaries (the per-step activation and gradient exchange) cross nodes. With
        tasks per node a multiple of K every replica sits on one node and none do."""
        nodes: dict[str, list[int]] = {}
        for r, h in enumerate(hosts):
            nodes.setdefault(h, []).append(r)
        crossing = sum(hosts[self.rank_of(k, d)] != hosts[self.rank_of(k + 1, d)]
                       for d in range(self.D) for k in range(self.K - 1))
        where = "; ".join(f"{h}: ranks {_ranges(rs)}" for h, rs in nodes.items())
        return (f"placement on {len(nodes)} node{'s' if len(nodes) > 1 else ''} ({where}); "
                f"{crossing} of {(self.K - 1) * self.D} stage boundaries cross nodes")


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    spans = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
