"""Shared pytest configuration for the metac test suite."""

pytest_plugins = ["metac.testing.fixtures"]
