"""berth.core.decode: Go-style durations and the typed decoder shared by config and RPC arguments."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth.core.decode import DecodeError, Duration, decode, encode, format_duration, parse_duration

# ---------------------------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("0s", 0.0),
        ("5s", 5.0),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("1h2m3.5s", 3723.5),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("100us", 1e-4),
        ("100µs", 1e-4),
        ("10ns", 1e-8),
        ("2h45m", 9900.0),
        ("1s500ms", 1.5),
        ("  5s  ", 5.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    parsed = parse_duration(text)
    assert isinstance(parsed, Duration)
    assert parsed == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("text", ["5", "-5s", "5 s", "1e3s", "s", "ms", "5sec", "1h-5m", "1.5.5s", "five seconds",
                                  "5s!", "1d"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.1, "100ms"),
        (0.25, "250ms"),
        (0.0005, "500us"),
        (1.5, "1.5s"),
        (5, "5s"),
        (90, "1m30s"),
        (90.5, "1m30.5s"),
        (3600, "1h"),
        (3661, "1h1m1s"),
        (7200 + 30, "2h30s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("seconds", [60.00001, 3600.000001, 1e-12, 12.3456789, 0.123456789, 1e-6 + 1e-9])
def test_format_duration_round_trips_awkward_values(seconds: float) -> None:
    # No exponent notation ("1m1e-05s") and nanosecond precision: the text must parse back.
    text = format_duration(seconds)
    assert "e" not in text.replace("µ", "")
    assert parse_duration(text) == pytest.approx(seconds, abs=1e-9)


@given(st.floats(min_value=0, max_value=10 * 365 * 24 * 3600, allow_nan=False, allow_infinity=False))
def test_format_parse_round_trip(seconds: float) -> None:
    text = format_duration(seconds)
    back = parse_duration(text)
    # Go durations are nanoseconds; the text keeps at least that, and the float arithmetic adds a rounding error.
    assert math.isclose(back, seconds, rel_tol=1e-12, abs_tol=1e-9), (seconds, text, back)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ns", "us", "ms", "s", "m", "h"]))
def test_parse_format_round_trip_of_whole_units(count: int, unit: str) -> None:
    seconds = parse_duration(f"{count}{unit}")
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-12, abs=1e-9)


# ---------------------------------------------------------------------------------------------- decode


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(kw_only=True)
class Inner:
    name: str
    size: int = 0


@dataclass(kw_only=True)
class Everything:
    text: str = ""
    count: int = 0
    ratio: float = 0.0
    flag: bool = False
    timeout: Duration = Duration(1.0)
    blob: bytes = b""
    mode: Literal["a", "b"] = "a"
    color: Color = Color.RED
    maybe: int | None = None
    either: int | str = 0
    items: list[int] = field(default_factory=list)
    pair: tuple[str, ...] = ()
    table: dict[str, int] = field(default_factory=dict)
    inner: Inner | None = None
    inners: list[Inner] = field(default_factory=list)
    anything: Any = None


@dataclass(kw_only=True)
class Checked:
    low: int = 0
    high: int = 10

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")


@dataclass(kw_only=True)
class Outer:
    checked: Checked = field(default_factory=Checked)
    required: Inner


def test_decode_defaults() -> None:
    assert decode(Everything, {}) == Everything()


def test_decode_every_supported_type() -> None:
    value = decode(Everything, {
        "text": "hi", "count": 3, "ratio": 2, "flag": True, "timeout": "1m30s", "blob": b"\x00\x01",
        "mode": "b", "color": "blue", "maybe": None, "either": "x", "items": [1, 2], "pair": ["p", "q"],
        "table": {"k": 1}, "inner": {"name": "n"}, "inners": [{"name": "a", "size": 2}],
        "anything": {"free": ["form"]},
    })
    assert value.text == "hi"
    assert value.count == 3
    assert value.ratio == 2.0
    assert isinstance(value.ratio, float)
    assert value.flag is True
    assert value.timeout == 90.0
    assert isinstance(value.timeout, Duration)
    assert value.blob == b"\x00\x01"
    assert value.mode == "b"
    assert value.color is Color.BLUE
    assert value.maybe is None
    assert value.either == "x"
    assert value.items == [1, 2]
    assert value.pair == ("p", "q")
    assert value.table == {"k": 1}
    assert value.inner == Inner(name="n")
    assert value.inners == [Inner(name="a", size=2)]
    assert value.anything == {"free": ["form"]}


def test_decode_duration_accepts_plain_seconds() -> None:
    assert decode(Everything, {"timeout": 2}).timeout == 2.0
    assert decode(Everything, {"timeout": 0.5}).timeout == 0.5


def test_decode_union_picks_the_matching_option() -> None:
    assert decode(Everything, {"either": 4}).either == 4
    assert decode(Everything, {"maybe": 7}).maybe == 7


@pytest.mark.parametrize(
    ("raw", "path", "fragment"),
    [
        ({"text": 1}, ("text",), "expected string, got integer 1"),
        ({"count": "3"}, ("count",), "expected integer, got string '3'"),
        ({"count": True}, ("count",), "expected integer, got boolean"),
        ({"count": 1.5}, ("count",), "expected integer"),
        ({"ratio": "1"}, ("ratio",), "expected number"),
        ({"ratio": False}, ("ratio",), "expected number"),
        ({"flag": 1}, ("flag",), "expected boolean"),
        ({"flag": "true"}, ("flag",), "expected boolean"),
        ({"timeout": "soon"}, ("timeout",), "invalid duration 'soon'"),
        ({"timeout": -1}, ("timeout",), "expected duration"),
        ({"timeout": True}, ("timeout",), "expected duration"),
        ({"blob": "text"}, ("blob",), "expected bytes"),
        ({"mode": "c"}, ("mode",), "must be one of 'a', 'b'"),
        ({"color": "green"}, ("color",), "must be one of 'red', 'blue'"),
        ({"maybe": "x"}, ("maybe",), "expected integer"),
        ({"either": 1.5}, ("either",), "expected integer or string"),
        ({"items": 1}, ("items",), "expected array"),
        ({"items": [1, "two"]}, ("items", "[1]"), "expected integer"),
        ({"pair": "ab"}, ("pair",), "expected array"),
        ({"table": []}, ("table",), "expected table"),
        ({"table": {"k": "v"}}, ("table", "k"), "expected integer"),
        ({"inner": 5}, ("inner",), "expected table"),
        ({"inner": {}}, ("inner", "name"), "required key is missing"),
        ({"inner": {"name": "n", "colour": 1}}, ("inner", "colour"), "unknown key (known keys: name, size)"),
        ({"inners": [{"name": "a"}, {"name": 2}]}, ("inners", "[1]", "name"), "expected string"),
        ({"bogus": 1}, ("bogus",), "unknown key"),
    ],
)
def test_decode_errors_carry_the_path(raw: dict[str, Any], path: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(Everything, raw, ("plugins", "io.x.v1.y"))
    assert info.value.path == ("plugins", "io.x.v1.y", *path)
    assert fragment in info.value.message
    assert str(info.value).startswith(".".join(("plugins", "io.x.v1.y", *path)) + ": ")


def test_decode_literal_is_strict_about_types() -> None:
    @dataclass
    class One:
        value: Literal[1] = 1

    with pytest.raises(DecodeError, match="must be one of 1"):
        decode(One, {"value": True})


def test_decode_dict_keys_must_be_strings() -> None:
    with pytest.raises(DecodeError, match="keys must be strings") as info:
        decode(Everything, {"table": {1: 2}})
    assert info.value.path == ("table",)


def test_decode_post_init_refusal_is_reported_at_the_dataclass() -> None:
    with pytest.raises(DecodeError) as info:
        decode(Outer, {"required": {"name": "x"}, "checked": {"low": 5, "high": 1}})
    assert info.value.path == ("checked",)
    assert "low (5) is above high (1)" in str(info.value)


def test_decode_top_level_errors() -> None:
    with pytest.raises(DecodeError) as info:
        decode(Everything, [1])
    assert info.value.path == ()
    assert str(info.value).startswith("(top level): expected table")
    with pytest.raises(DecodeError, match="required key is missing"):
        decode(Outer, {})


def test_decode_unsupported_type_is_an_error() -> None:
    @dataclass
    class Weird:
        value: complex = 0j

    with pytest.raises(DecodeError, match="cannot decode"):
        decode(Weird, {"value": 1})


def test_encode_is_plain_data_and_decodes_back() -> None:
    value = Everything(text="t", timeout=Duration(90), color=Color.BLUE, pair=("a",), inner=Inner(name="n"),
                       table={"k": 2}, inners=[Inner(name="m", size=1)])
    plain = encode(value)
    assert plain["timeout"] == "1m30s"
    assert plain["color"] == "blue"
    assert plain["pair"] == ["a"]
    assert plain["inner"] == {"name": "n", "size": 0}
    assert "maybe" not in plain  # None is left out: TOML has no null
    assert "anything" not in plain
    assert decode(Everything, plain) == value
