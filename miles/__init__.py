"""Miles: RL post-training for large language models, one model definition for trainer and rollout engine."""

__version__ = "0.1.0"
