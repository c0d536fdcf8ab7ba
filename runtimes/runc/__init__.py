"""Driving runc, or any binary with runc's command line (``berth-runtime``): :class:`RuncCommand`
(used by the shim) and the ``io.berth.runtime.v1.runc`` plugin."""
