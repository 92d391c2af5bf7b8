"""Trainers: serial baseline, layer-parallel (AuxNet) trainer, losses and schedules."""
