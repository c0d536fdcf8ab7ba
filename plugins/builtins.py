"""The plugin modules built into berthd, in registration order (containerd's ``builtins.go``)."""

BUILTIN_PLUGINS: tuple[str, ...] = (
    "berth.plugins.events",
    "berth.plugins.content.local.plugin",
    "berth.snapshotters.overlayfs.plugin",
    "berth.snapshotters.native.plugin",
    "berth.snapshotters.btrfs.plugin",
    "berth.plugins.metadata.plugin",
    "berth.plugins.differ.plugin",
    "berth.plugins.gc.scheduler",
    "berth.plugins.leases",
    "berth.plugins.services.namespaces",
    "berth.plugins.services.content",
    "berth.plugins.services.leases",
    "berth.plugins.services.snapshots",
    "berth.plugins.services.containers",
    "berth.plugins.services.images",
    "berth.plugins.images.plugin",
    "berth.plugins.services.transfer",
    "berth.plugins.services.version",
    "berth.plugins.services.introspection",
    "berth.plugins.services.events",
)
