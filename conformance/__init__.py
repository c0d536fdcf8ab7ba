"""berth conformance."""
