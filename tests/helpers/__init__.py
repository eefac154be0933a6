"""Shared helpers of the test suite (import as ``from tests.helpers import ...``)."""
