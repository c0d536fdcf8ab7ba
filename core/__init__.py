"""berth's core: the parts every plugin and the client share.

General layout: ``errdefs`` (errors, stdlib only) and ``rpc.protocol`` (the wire format, msgpack
only) are what the client loads, so importing :mod:`berth.core` stays light: no trio, structlog or
pluggy here. The plugin model lives in :mod:`berth.core.plugin`, config in :mod:`berth.core.config`,
the daemon in :mod:`berth.core.daemon` and the RPC server in :mod:`berth.core.rpc.server`.
"""

from berth.core.errdefs import Aborted as Aborted
from berth.core.errdefs import AlreadyExists as AlreadyExists
from berth.core.errdefs import BerthError as BerthError
from berth.core.errdefs import Canceled as Canceled
from berth.core.errdefs import Conflict as Conflict
from berth.core.errdefs import DataLoss as DataLoss
from berth.core.errdefs import DeadlineExceeded as DeadlineExceeded
from berth.core.errdefs import FailedPrecondition as FailedPrecondition
from berth.core.errdefs import Internal as Internal
from berth.core.errdefs import InvalidArgument as InvalidArgument
from berth.core.errdefs import NotFound as NotFound
from berth.core.errdefs import OutOfRange as OutOfRange
from berth.core.errdefs import PermissionDenied as PermissionDenied
from berth.core.errdefs import ResourceExhausted as ResourceExhausted
from berth.core.errdefs import Unauthenticated as Unauthenticated
from berth.core.errdefs import Unavailable as Unavailable
from berth.core.errdefs import Unimplemented as Unimplemented
from berth.core.errdefs import Unknown as Unknown

__version__ = "0.1.0"
