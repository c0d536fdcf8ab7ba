"""berth runtimes."""
