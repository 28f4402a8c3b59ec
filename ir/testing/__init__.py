"""Helpers for testing code that uses the IR: hypothesis strategies for random well-formed models.

See :mod:`ir.testing.strategies`; its docstring shows how to property-test your own pass.
"""

from __future__ import annotations

from .strategies import Mutation, graphs, inputs_for, models, mutations, recompute_uses

__all__ = ["Mutation", "graphs", "inputs_for", "models", "mutations", "recompute_uses"]
