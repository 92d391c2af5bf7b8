"""Layer-parallel pieces: the step, losses, the joint loss in one process, the composed chain,
held-out metrics, epoch records, the run's store view and checkpoints (docs/design.md §1-§5)."""
