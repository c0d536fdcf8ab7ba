"""The local (filesystem) content store, as containerd's ``plugins/content/local``."""
