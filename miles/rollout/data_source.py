"""slime/Miles import path for the data sources (`--data-source-path miles.rollout.data_source.…`)."""

from miles.rollout.data import RolloutDataSource, RolloutDataSourceWithBuffer, pop_first

__all__ = ["RolloutDataSource", "RolloutDataSourceWithBuffer", "pop_first"]
