"""slime/Miles import path: `--dynamic-sampling-filter-path miles.rollout.filter_hub.dynamic_sampling_filters.…`."""

from miles.rollout.filters import check_no_aborted, check_reward_nonzero_std

__all__ = ["check_no_aborted", "check_reward_nonzero_std"]
