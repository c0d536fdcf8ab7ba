"""The overlayfs snapshotter (``io.berth.snapshotter.v1.overlayfs``)."""
