"""hpcaux: layer-parallel training of residual networks with auxiliary-variable networks."""

__version__ = "0.1.0"
