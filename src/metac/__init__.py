"""metac: a Python implementation of the MetaContainer protocol."""

__version__ = "0.1.0"
