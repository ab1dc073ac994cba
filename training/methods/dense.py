"""The dense baseline: the same loop and budget, no gates, nothing removed."""
from __future__ import annotations

from ..models import SpecNet, build_model
from .base import Method


class DenseMethod(Method):
    def build_model(self) -> SpecNet:
        return build_model(self.dense_spec)
