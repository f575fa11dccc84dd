"""Shared plumbing of every metac process; knows no service."""
