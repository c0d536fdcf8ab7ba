"""The metadata plugin."""
