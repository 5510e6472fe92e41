"""Compatibility aliases for code ported from slime / Miles (`from miles.utils.types import Sample`)."""
