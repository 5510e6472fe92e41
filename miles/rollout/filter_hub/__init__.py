"""slime/Miles import paths for the dynamic-sampling filters."""
