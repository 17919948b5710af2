"""Helpers below every layer: atomic writes, host transfers, error text, signals, partial losses."""
