"""The `metac` command line: argparse front, one module per command group."""
