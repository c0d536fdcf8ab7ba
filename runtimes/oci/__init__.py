"""OCI runtime spec generation from an image config and container options (containerd's ``oci``
package): :func:`build_spec` / :func:`generate_spec`, :class:`SpecOptions`, the user resolution of
:mod:`.user`, containerd's default seccomp profile, and plugins' ``berth_adjust_spec`` hook."""

from berth.runtimes.oci.adjust import apply_spec_adjustments as apply_spec_adjustments
from berth.runtimes.oci.seccomp import default_seccomp_profile as default_seccomp_profile
from berth.runtimes.oci.spec import ALL_CAPABILITIES as ALL_CAPABILITIES
from berth.runtimes.oci.spec import DEFAULT_CAPABILITIES as DEFAULT_CAPABILITIES
from berth.runtimes.oci.spec import DEFAULT_PATH as DEFAULT_PATH
from berth.runtimes.oci.spec import OCI_VERSION as OCI_VERSION
from berth.runtimes.oci.spec import SpecOptions as SpecOptions
from berth.runtimes.oci.spec import build_spec as build_spec
from berth.runtimes.oci.spec import generate_spec as generate_spec
from berth.runtimes.oci.spec import parse_mount as parse_mount
from berth.runtimes.oci.user import ResolvedUser as ResolvedUser
from berth.runtimes.oci.user import UserFiles as UserFiles
from berth.runtimes.oci.user import read_user_files as read_user_files
from berth.runtimes.oci.user import resolve_user as resolve_user
