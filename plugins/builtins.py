"""The plugin modules built into berthd, in registration order (containerd's ``builtins.go``)."""

BUILTIN_PLUGINS: tuple[str, ...] = (
    "berth.plugins.events",
    "berth.plugins.services.namespaces",
    "berth.plugins.services.version",
    "berth.plugins.services.introspection",
    "berth.plugins.services.events",
)
