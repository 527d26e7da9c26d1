"""Leaf helpers that import nothing else of the package (figures)."""
