"""hpcaux: layer-parallel ResNet training with auxiliary-variable networks.

Versions here are loose lower bounds so that `pip install .` works on a cluster's own
stack; the exact stack this project is developed and tested with is pinned in
constraints.txt and installed by scripts/install.sh.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

# The version lives in hpcaux/__init__.py alone; read, not imported (torch need not be installed yet).
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "hpcaux" / "__init__.py").read_text(),
                    re.M).group(1)

setup(
    name="hpcaux",
    version=VERSION,
    description="Layer-parallel ResNet training with auxiliary-variable networks (MPI, Horovod, HDF5, SLURM)",
    packages=find_packages(include=["hpcaux", "hpcaux.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy", "PyYAML", "tqdm", "h5py", "mpi4py", "matplotlib"],
    extras_require={
        "vision": ["torchvision>=0.16", "Pillow"],
        "horovod": ["horovod>=0.28"],
        "test": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["hpcaux=hpcaux.cli:main"]},
)
