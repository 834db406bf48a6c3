"""Search strategies: ``random``, ``ga`` (NSGA-II), ``ppo`` and ``bo``."""

from graphsurgeon.search.strategies.base import STRATEGIES, Score, Strategy, get_strategy

__all__ = ["STRATEGIES", "Score", "Strategy", "get_strategy"]
