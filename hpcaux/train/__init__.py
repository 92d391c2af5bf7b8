"""Trainers: the one epoch loop, serial backprop, the distributed baselines and the
layer-parallel trainer (docs/design.md §3)."""
