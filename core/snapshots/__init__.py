"""Snapshotters: the interface (:mod:`.snapshotter`), the per-snapshotter metastore
(:mod:`.storage`) and mounting (:mod:`.mount`)."""
