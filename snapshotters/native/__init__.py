"""The native (copying) snapshotter (``io.berth.snapshotter.v1.native``)."""
