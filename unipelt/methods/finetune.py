"""Baselines: full fine-tuning (the whole encoder trains) and head-only (nothing is attached)."""
from __future__ import annotations

from .base import PeltMethod, register_method


@register_method
class FinetuneMethod(PeltMethod):
    name = "finetune"
    trains_encoder = True
