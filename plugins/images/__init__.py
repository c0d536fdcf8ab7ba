"""Images: the registry client, pull, push, import/export and the image service."""
