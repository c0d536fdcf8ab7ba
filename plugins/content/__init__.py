"""Content store plugins."""
