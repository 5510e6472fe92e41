"""slime/Miles import path for `Sample`: `from miles.utils.types import Sample` keeps working."""

from miles.rollout.sample import Sample

__all__ = ["Sample"]
