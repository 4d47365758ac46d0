"""Thin Dagster wiring: assets, resources, checks, schedules."""
