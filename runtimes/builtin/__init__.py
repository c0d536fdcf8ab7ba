"""berth's own OCI runtime in Python (io.berth.runtime.v1.builtin) and its runc-compatible command."""
