"""Scoring methods, chosen by name: ``METHODS.get("summed_attention")``."""

from .base import METHODS, Method, needle_mass, register
from . import summed_attention  # noqa: F401  (registers itself)

__all__ = ["METHODS", "Method", "needle_mass", "register"]
