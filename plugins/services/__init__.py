"""berth plugins/services."""
