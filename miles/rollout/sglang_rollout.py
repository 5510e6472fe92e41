"""slime's import path for the default rollout and generate functions (`slime.rollout.sglang_rollout`)."""

from miles.rollout.generate import generate
from miles.rollout.rollout import generate_rollout

__all__ = ["generate", "generate_rollout"]
