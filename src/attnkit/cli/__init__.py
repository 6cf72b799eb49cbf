"""Command-line interface: a thin layer over library functions that return reports."""
