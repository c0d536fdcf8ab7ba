"""berth's own OCI runtime, in Python: the library (:mod:`.container`) and the runc-compatible
``berth-runtime`` command (:mod:`.cli`), which the ``io.berth.runtime.v1.builtin`` plugin's shims run."""
