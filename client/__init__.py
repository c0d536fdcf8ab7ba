"""berth's client side: :class:`berth.client.sync.Client` (blocking, stdlib + msgpack only), the trio
client :func:`berth.client.aio.open_client`, and the ``berth`` CLI (:mod:`berth.client.cli`).

This package's ``__init__`` imports nothing, so ``berth`` starts fast.
"""
