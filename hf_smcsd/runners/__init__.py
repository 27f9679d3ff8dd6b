"""Model backends for the SMC loop: one module each, all behind `base.Runner`."""

from .base import Runner
from .eager import EagerRunner

__all__ = ["Runner", "EagerRunner"]
