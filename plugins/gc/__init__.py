"""The garbage collection scheduler plugin."""
