"""Compression search: per-layer policies, strategies, evaluation, the policy database."""

from graphsurgeon.search.policy import Decision, Policy
from graphsurgeon.search.space import METHODS, Method, SearchSpace, Slot
from graphsurgeon.search.tune import TuneResult, tune

__all__ = ["METHODS", "Decision", "Method", "Policy", "SearchSpace", "Slot", "TuneResult", "tune"]
