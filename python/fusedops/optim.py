"""Fused Adam and AdamW (filled in by the optimizer work)."""
