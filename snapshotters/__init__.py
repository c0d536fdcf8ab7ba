"""berth snapshotters."""
