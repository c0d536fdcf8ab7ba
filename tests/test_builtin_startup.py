"""berth-runtime's start-up helpers: JSON without the json module, signal names without the signal module,
and the import budget of a runtime command that they exist for."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth.runtimes.builtin import quickjson, signals

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_quickjson_encodes_as_json_does(value: object) -> None:
    assert quickjson.dumps(value) == json.dumps(value)
    assert quickjson.dumps(value, indent=2) == json.dumps(value, indent=2)


@given(json_values)
def test_quickjson_reads_what_json_writes(value: object) -> None:
    text = json.dumps(value)
    assert quickjson.loads(text) == json.loads(text)
    assert quickjson.loads(f" \n{text}\t\r\n") == value
    assert quickjson.loads(text.encode()) == value


@pytest.mark.parametrize("text", ["", " ", "[1,", '{"a": }', "[1] x", "nul", '"abc', "{'a': 1}", "[1,]", '"\x01"'])
def test_quickjson_refuses_what_json_refuses_with_its_message(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        quickjson.loads(text)
    assert str(got.value) == str(expected.value)


def test_quickjson_edges() -> None:
    assert math.isnan(quickjson.loads("NaN"))
    assert quickjson.loads("-Infinity") == -math.inf
    assert quickjson.loads(b"\xef\xbb\xbf[1]") == [1]  # a UTF-8 BOM, as json.loads reads bytes
    with pytest.raises(UnicodeDecodeError):
        quickjson.loads(b'"\xff\xfe\xfa"x')
    with pytest.raises(TypeError, match="not JSON serializable"):
        quickjson.dumps({"a": object()})
    with pytest.raises(ValueError, match="nested too deeply"):
        quickjson.loads("[" * 100_000 + "]" * 100_000)
    circular: list[object] = []
    circular.append(circular)
    with pytest.raises(ValueError, match=r"[Cc]ircular"):
        quickjson.dumps(circular)


@pytest.mark.parametrize(("text", "number"), [
    ("9", 9), ("KILL", signal.SIGKILL), ("sigterm", signal.SIGTERM), ("SIGHUP", signal.SIGHUP),
    ("usr1", signal.SIGUSR1),
    ("RTMIN", signal.SIGRTMIN), ("RTMIN+3", signal.SIGRTMIN + 3), ("sigrtmax-2", signal.SIGRTMAX - 2),
    ("99", 99),  # numbers pass, as runc's do: kill(2) judges them
])
def test_signal_names(text: str, number: int) -> None:
    assert signals.number(text) == number


@pytest.mark.parametrize("text", ["FOO", "SIG_DFL", "DFL", "RTMIN+99", "RTMAX-99", "", "-9", "TERM+1"])
def test_unknown_signal_names(text: str) -> None:
    with pytest.raises(ValueError, match="unknown signal"):
        signals.number(text)


def test_runtime_commands_import_no_heavy_stdlib_modules() -> None:
    """The modules a create/start/state/run imports leave out json, re, enum, typing, contextlib and
    collections: each costs every runtime command start-up time (see quickjson and signals). The child
    starts as bin/berth-runtime starts Python, with the berth package found the same way."""
    import berth.runtimes

    home = str(Path(next(iter(berth.runtimes.__path__))).parent)
    code = (
        "import sys\n"
        "package = type(sys)('berth')\n"
        "package.__path__ = [sys.argv[1]]\n"
        "sys.modules['berth'] = package\n"
        "from berth.runtimes.builtin import cli, container, process\n"
        "heavy = {'json', 're', 'enum', 'typing', 'contextlib', 'collections', 'functools', 'signal', 'threading'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-S", "-I", "-c", code, home], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
