"""Persistence: checkpoints (per stage, manifest, atomic latest); later the HDF5 store."""
