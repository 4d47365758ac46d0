"""Errors for bad input: each names the column, row or setting at fault."""


class DataValidationError(ValueError):
    """The input data or its configuration cannot be used; raised before any expensive work."""
