"""immich-ml: a drop-in machine-learning backend for Immich."""

__version__ = "0.1.0"
