"""world = K stages x D replicas: which stage and replica a rank owns, and its peers."""
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
        return self.rank // self.K

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.K - 1

    def stage_of(self, rank: int) -> int:
        return rank % self.K

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        return (self.replica if replica is None else replica) * self.K + stage

    def stage_ranks(self, stage: int) -> list[int]:
        """The D ranks holding replicas of `stage` (their gradients are averaged)."""
        return [self.rank_of(stage, r) for r in range(self.D)]

    def replica_ranks(self, replica: int) -> list[int]:
        return [self.rank_of(s, replica) for s in range(self.K)]
