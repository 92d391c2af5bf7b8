"""Run plumbing shared by every trainer: run directory, progress, devices and threads, the
learning-rate schedule and optimiser, stop signals, the rank layout, evaluation in one process."""
