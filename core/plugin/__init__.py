"""The plugin model: what a plugin author imports.

``Registration`` declares a plugin, ``hookimpl`` marks its ``berth_register`` hook, ``InitContext``
is what its ``init`` receives, ``SkipPlugin`` says "not applicable here", ``PluginType`` names the
built-in types and ``plugin_ref`` declares a config key that names another plugin.
"""

from berth.core.plugin.graph import CircularDependency as CircularDependency
from berth.core.plugin.graph import plugin_graph as plugin_graph
from berth.core.plugin.hookspecs import hookimpl as hookimpl
from berth.core.plugin.hookspecs import hookspec as hookspec
from berth.core.plugin.manager import ENTRY_POINT_GROUP as ENTRY_POINT_GROUP
from berth.core.plugin.manager import LoadError as LoadError
from berth.core.plugin.manager import load_plugins as load_plugins
from berth.core.plugin.registration import InitContext as InitContext
from berth.core.plugin.registration import LoadedPlugin as LoadedPlugin
from berth.core.plugin.registration import Meta as Meta
from berth.core.plugin.registration import PluginSet as PluginSet
from berth.core.plugin.registration import PluginStatus as PluginStatus
from berth.core.plugin.registration import Registration as Registration
from berth.core.plugin.registration import Registry as Registry
from berth.core.plugin.registration import ServerInfo as ServerInfo
from berth.core.plugin.registration import SkipPlugin as SkipPlugin
from berth.core.plugin.registration import plugin_ref as plugin_ref
from berth.core.plugin.types import PluginType as PluginType
