"""Interoperability with other tools (HF peft)."""
