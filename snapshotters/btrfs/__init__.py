"""``io.berth.snapshotter.v1.btrfs``: snapshots as btrfs subvolumes (see :mod:`.btrfs`)."""
