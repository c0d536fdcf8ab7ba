"""The public surface of berth.core: error classes and their wire form, and the client's light imports."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

import berth.core
from berth.core import errdefs
from berth.core.errdefs import BerthError, Unknown, error_from_wire, error_to_wire

ERROR_CLASSES = sorted(
    (cls for _, cls in inspect.getmembers(errdefs, inspect.isclass)
     if issubclass(cls, BerthError) and cls.__module__ == errdefs.__name__),
    key=lambda cls: cls.__name__,
)


def test_every_error_class_is_found() -> None:
    # guards the parametrisation below against finding nothing
    assert len(ERROR_CLASSES) >= 18
    assert BerthError in ERROR_CLASSES


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_facade_reexports_every_error(cls: type[BerthError]) -> None:
    assert getattr(berth.core, cls.__name__) is cls
    assert cls.__name__ in errdefs.__all__


def test_codes_are_unique_except_the_root() -> None:
    codes = [cls.code for cls in ERROR_CLASSES if cls is not BerthError]
    assert len(codes) == len(set(codes))
    assert BerthError.code == Unknown.code == "unknown"


@pytest.mark.parametrize("cls", [c for c in ERROR_CLASSES if c is not BerthError], ids=lambda cls: cls.__name__)
def test_wire_round_trip(cls: type[BerthError]) -> None:
    original = cls(f"something about {cls.__name__} \u00e9")
    wire = error_to_wire(original)
    assert wire == {"code": cls.code, "message": original.message}
    json.dumps(wire)  # plain data only
    back = error_from_wire(wire)
    assert type(back) is cls
    assert back.message == original.message
    assert str(back) == original.message


def test_the_root_class_travels_as_unknown() -> None:
    back = error_from_wire(error_to_wire(BerthError("plain")))
    assert type(back) is Unknown
    assert back.message == "plain"


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"code": "no_such_code", "message": "hello"}, "no_such_code: hello"),
        ({"code": 5, "message": "hello"}, "hello"),
        ({"message": "no code"}, "no code"),
        ("not a map", "malformed error from peer"),
        (None, "malformed error from peer"),
    ],
)
def test_unrecognised_wire_errors_become_unknown(payload: object, fragment: str) -> None:
    error = error_from_wire(payload)
    assert type(error) is Unknown
    assert fragment in error.message


def test_a_wrong_message_type_keeps_the_code() -> None:
    error = error_from_wire({"code": "not_found", "message": 42})
    assert type(error) is errdefs.NotFound
    assert error.message == "42"


_PROBE = """
import json, sys
import berth.client.sync, berth.client.cli
heavy = ["trio", "structlog", "pluggy", "berth.core.daemon", "berth.core.config", "berth.core.plugin",
         "berth.core.rpc.server", "berth.core.events", "berth.core.decode"]
print(json.dumps(sorted(name for name in heavy if name in sys.modules)))
"""


def test_client_imports_stay_light() -> None:
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
