"""msgpack-RPC: the wire protocol (:mod:`.protocol`, msgpack only) and the trio server (:mod:`.server`)."""
