"""slime/Miles import path for `DynamicFilterOutput`."""

from miles.rollout.filters import DynamicFilterOutput

__all__ = ["DynamicFilterOutput"]
