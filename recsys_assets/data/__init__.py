"""Spark transforms and MDS writing (no torch model code)."""
