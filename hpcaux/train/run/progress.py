"""Rank 0's progress bar (tqdm) and per-epoch lines; silent on other ranks."""
from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, enabled: bool = True, rank: int = 0):
        self.active = rank == 0
        self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True,
                        disable=not (enabled and self.active), leave=False)

    def update(self, text: str | None):
        """One step done; `text` (None: keep the last) is read only on the epoch loop's
        host reads, so the bar asks nothing of a GPU between them."""
        if text is not None:
            self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(1)

    def note(self, text: str):
        """A line that stays (epoch summaries), printed above the bar."""
        if self.active:
            self.bar.write(text, file=sys.stdout)
            sys.stdout.flush()

    def close(self):
        self.bar.close()
