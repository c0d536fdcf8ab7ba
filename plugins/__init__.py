"""berth plugins."""
