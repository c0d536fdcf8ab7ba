"""Typed RPC arguments: declare a handler's arguments as a dataclass and get them checked.

::

    @dataclass(kw_only=True)
    class GetArgs:
        name: str

    @typed_args(GetArgs)
    async def get(call: Call, args: GetArgs) -> dict[str, Any]: ...

A missing key, an unknown key or a wrong type is ``invalid_argument`` naming the method and key.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from berth.core.decode import DecodeError, decode
from berth.core.errdefs import InvalidArgument
from berth.core.rpc.server import Handler

__all__ = ["decode_args", "typed_args"]

A = TypeVar("A")


def decode_args(cls: type[A], args: dict[str, Any], method: str) -> A:
    """Decode ``args`` into ``cls``.

    Raises:
        InvalidArgument: naming the method and the offending key.
    """
    try:
        return decode(cls, args, ("args",))
    except DecodeError as err:
        raise InvalidArgument(f"{method}: {err}") from None


def typed_args(cls: type[A]) -> Callable[[Callable[..., Awaitable[Any]]], Handler]:
    """Wrap a handler (function or method) taking a decoded ``cls`` into a plain RPC handler."""

    def wrap(function: Callable[..., Awaitable[Any]]) -> Handler:
        @functools.wraps(function)
        async def handler(*params: Any) -> Any:
            *bound, call, args = params  # (self,) call, args
            return await function(*bound, call, decode_args(cls, args, call.method))

        handler.berth_args = cls  # type: ignore[attr-defined]
        return handler

    return wrap
