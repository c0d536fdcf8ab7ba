"""``io.berth.rpc.v1.hello``: an example out-of-tree berth plugin.

It serves one RPC method, ``hello.greet``, which answers ``{"message": "<greeting>, <name>"}`` and
publishes a ``/hello/greeted`` event in the caller's namespace. The greeting comes from the config::

    [plugins."io.berth.rpc.v1.hello"]
    greeting = "ahoy"
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from berth.core.errdefs import InvalidArgument
from berth.core.events import Exchange
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.core.rpc.args import typed_args
from berth.core.rpc.server import Call, Handler, inline

__all__ = ["TOPIC", "Config", "GreetArgs", "HelloService", "berth_register", "init"]

#: The topic of the event published on each greeting.
TOPIC = "/hello/greeted"


@dataclass(kw_only=True)
class Config:
    """``[plugins."io.berth.rpc.v1.hello"]``: every field needs a default."""

    #: The word put before the name.
    greeting: str = "hello"

    def __post_init__(self) -> None:
        # A ValueError here becomes a config error naming the file, the table and the message.
        if not self.greeting.strip():
            raise ValueError("greeting must not be empty")


@dataclass(kw_only=True)
class GreetArgs:
    """The arguments of ``hello.greet``."""

    name: str


class HelloService:
    """The plugin's instance: an RPC service (it has ``rpc_methods``) with an ``aclose``."""

    def __init__(self, greeting: str, exchange: Exchange, ic: InitContext) -> None:
        self.greeting = greeting
        self.exchange = exchange
        self.log = ic.log
        self.greeted = 0

    # inline: the handler never waits on anything (publishing never blocks), so it may run in the
    # connection's reader task. typed_args: a missing, unknown or mistyped key is invalid_argument.
    @inline
    @typed_args(GreetArgs)
    async def greet(self, call: Call, args: GreetArgs) -> dict[str, Any]:
        """``hello.greet {name}`` -> ``{message}``; publishes ``/hello/greeted`` in the call's namespace.

        Raises:
            InvalidArgument: ``name`` is empty.
        """
        if not args.name:
            raise InvalidArgument("hello.greet: name must not be empty")
        message = f"{self.greeting}, {args.name}"
        self.exchange.publish(call.namespace, TOPIC, {"name": args.name, "message": message})
        self.greeted += 1
        return {"message": message}

    def rpc_methods(self) -> Mapping[str, Handler]:
        """The methods the daemon's RPC server serves for this plugin, by full name."""
        return {"hello.greet": self.greet}

    async def aclose(self) -> None:
        """Called once at shutdown (bounded by ``timeouts.plugin_close``)."""
        self.log.info("hello_closed", greeted=self.greeted)


async def init(ic: InitContext) -> HelloService:
    """Build the instance. Runs after the event exchange (``requires``) is initialised."""
    config: Config = ic.config
    exchange: Exchange = ic.get_single(PluginType.EVENT)
    ic.meta.exports["greeting"] = config.greeting
    ic.meta.capabilities.append("greet")
    return HelloService(config.greeting, exchange, ic)


@hookimpl
def berth_register(registry: Registry) -> None:
    """Declare the plugin; no I/O here, the work happens in :func:`init`."""
    registry.register(Registration(
        type=PluginType.RPC,
        id="hello",
        init=init,
        config=Config,
        requires=(PluginType.EVENT,),
    ))
