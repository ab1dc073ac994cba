"""The dense baseline: the same loop and budget, no gates, nothing removed (the base method as it is)."""
from __future__ import annotations

from .base import Method


class DenseMethod(Method):
    pass
