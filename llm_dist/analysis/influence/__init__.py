"""Data influence: TracIn-CP over a run's checkpoints on projected per-example gradients (`llm-dist influence`)."""
from .cli import influence, main, query
from .tracin import InfluenceError

__all__ = ["influence", "main", "query", "InfluenceError"]
