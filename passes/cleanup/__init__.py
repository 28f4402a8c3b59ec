"""Cleanup passes: dead-flow elimination, constant folding, algebraic simplification.

Every public module here is imported by the pass registry's discovery; a module that does not
import is an error, not a silently missing pass.
"""
