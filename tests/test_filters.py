"""berth.core.filters: containerd's filter syntax (cases ported from containerd's pkg/filters/filter_test.go)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from berth.core.errdefs import InvalidArgument
from berth.core.filters import Adaptor, mapping_adaptor, parse_filters


@dataclass
class Entry:
    name: str = ""
    other: str = ""
    labels: dict[str, str] = field(default_factory=dict)


# containerd's corpus, in its order.
CORPUS = [
    Entry("foo", labels={"foo": "true"}),
    Entry("bar"),
    Entry("foo", labels={"foo": "present", "more complex label": "present"}),
    Entry("bar", labels={"bar": "true"}),
    Entry("fooer", labels={'more complex label with \\ and "': "present"}),
    Entry("fooer", labels={'more complex label with \\ and ".post': "present"}),
    Entry("baz", other="too complex, yo"),
    Entry("bazo", other="abc"),
    Entry("compound", labels={"foo": "omg_asdf.asdf-qwer"}),
]


def adapt(entry: Entry) -> Adaptor:
    """containerd's example adaptor: empty strings are absent, label paths are joined with '.'."""

    def field_of(path: Sequence[str]) -> tuple[str, bool]:
        if path[0] == "name":
            return entry.name, bool(entry.name)
        if path[0] == "other":
            return entry.other, bool(entry.other)
        if path[0] == "labels":
            key = ".".join(path[1:])
            return entry.labels.get(key, ""), key in entry.labels
        return "", False

    return field_of


def matching(filters: Sequence[str]) -> list[int]:
    parsed = parse_filters(filters)
    return [i for i, entry in enumerate(CORPUS) if parsed.match(adapt(entry))]


ALL = list(range(len(CORPUS)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ALL),
        ("name", ALL),
        ("labels.foo", [0, 2, 8]),
        ("labels.foo,name", [0, 2, 8]),
        ("labels.foo==true", [0]),
        ("labels.foo==omg_asdf.asdf-qwer", [8]),
        ("name==bar", [1, 3]),
        ("name!=bar", [0, 2, 4, 5, 6, 7, 8]),
        ("name==bar,labels.bar", [3]),
        ('other=="too complex, yo"', [6]),
        ("other~=[abc]+,name!=foo", [6, 7]),
        ("other~=/[abc]+/,name!=foo", [6, 7]),
        ("other~=/[abc]{1,2}/,name!=foo", [6, 7]),
        ('other~=/[abc]{0,1}"\\//,name!=foo', []),  # valid syntax, matches nothing
        ("name==bar,labels.bar==true", [3]),
        ("name==bar,labels.bar==wrong", []),
        ('name==foo,labels."more complex label"', [2]),
        ('labels."more complex label with \\\\ and \\""==present', [4]),
        ('labels."more complex label with \\\\ and \\"".post==present', [5]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_containerd_cases(text: str, expected: list[int]) -> None:
    assert matching([text]) == expected


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("labels.|foo|==omg_asdf.asdf-qwer", 7, "expected a field name or a quoted string"),
        ('labels.?"more complex label with \\\\ and \\"".post==present', 7, "expected a field name"),
        ("name==foo,", 10, "expected a field name"),
        ("labels.", 7, "expected a field name"),
        ("image~=,id?=?fbaq", 7, "expected a value"),
        ("labels.ns/key==value", 9, "expected an operator"),
        ("name=bar", 4, "expected an operator"),
        ("==bar", 0, "expected a field name"),
        ("name==bar baz", 10, "unexpected 'b'"),
        ('name=="bar', 10, "unterminated quoted string"),
        ("name~=/bar", 10, "unterminated quoted string"),
        ("name~=(", 7, "bad regular expression '('"),
    ],
)
def test_parse_errors_name_the_position(text: str, position: int, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_filters([text])
    message = str(info.value)
    assert fragment in message
    assert message.endswith(f"at position {position}")
    assert repr(text) in message


def test_a_bad_string_among_good_ones_is_still_an_error() -> None:
    with pytest.raises(InvalidArgument, match="position"):
        parse_filters(["name==foo", "name=="])


def test_several_strings_are_or() -> None:
    assert matching(["name==bar", "labels.foo==true"]) == [0, 1, 3]
    assert matching(["name==nobody", "other==abc"]) == [7]


def test_no_filters_or_an_empty_one_matches_everything() -> None:
    assert matching([]) == ALL
    assert matching(["  "]) == ALL
    # an empty alternative is "match all", so the OR of it with anything matches all
    assert matching(["name==bar", ""]) == ALL


def test_whitespace_around_tokens() -> None:
    assert matching(["  name == bar ,  labels.bar  "]) == [3]


def test_single_quotes_and_escapes_in_values() -> None:
    assert matching(["other=='too complex, yo'"]) == [6]
    obj = {"a": 'x"y', "b": "t\tab", "c": "back\\slash"}
    assert parse_filters(['a=="x\\"y"']).match_mapping(obj)
    assert parse_filters(['b=="t\\tab"']).match_mapping(obj)
    assert parse_filters(['c=="back\\\\slash"']).match_mapping(obj)
    assert not parse_filters(['c=="backslash"']).match_mapping(obj)


def test_alternative_regex_quotes_only_after_match_operator() -> None:
    obj = {"topic": "/images/create"}
    assert parse_filters(["topic~=|^/images/|"]).match_mapping(obj)
    assert parse_filters(["topic~=/^\\/images\\//"]).match_mapping(obj)
    assert not parse_filters(["topic~=|^/tasks/|"]).match_mapping(obj)
    # a field may never be quoted with / or |
    with pytest.raises(InvalidArgument):
        parse_filters(["|topic|==x"])


def test_regex_searches_anywhere_in_the_value() -> None:
    f = parse_filters(['topic~="/images/"'])
    assert f.match_mapping({"topic": "/images/create"})
    assert f.match_mapping({"topic": "/x/images/y"})
    assert not f.match_mapping({"topic": "/tasks/exit"})
    anchored = parse_filters(['topic~="^/images/"'])
    assert not anchored.match_mapping({"topic": "/x/images/y"})


def test_operators_on_missing_fields() -> None:
    missing = {"other": "x"}
    assert not parse_filters(["name"]).match_mapping(missing)
    assert not parse_filters(["name==x"]).match_mapping(missing)
    assert not parse_filters(['name==""']).match_mapping(missing)  # == needs the field present
    assert parse_filters(["name!=x"]).match_mapping(missing)  # containerd: "" != "x"
    assert parse_filters(["name~=.*"]).match_mapping(missing)  # containerd matches the regex against ""


def test_mapping_adaptor() -> None:
    obj = {
        "topic": "/tasks/exit",
        "namespace": "k8s.io",
        "event": {"container_id": "c1", "pid": 42, "ok": True, "gone": None, "nested": {"x": "1"}, "list": [1]},
        "labels": {"berth.io/gc.root": "2024", "a b": "c"},
    }
    cases = {
        'topic=="/tasks/exit",namespace==k8s.io': True,
        'topic~="/tasks/",namespace==default': False,
        "event.container_id==c1": True,
        "event.pid==42": True,
        "event.ok==true": True,
        "event.gone": False,  # None counts as absent
        "event.nested.x==1": True,
        "event.nested": True,  # a table is present (its value compares as "")
        "event.list": True,
        "event.missing": False,
        "event.pid.deeper": False,
        'labels."berth.io/gc.root"': True,
        'labels."berth.io/gc.root"==2024': True,
        "labels.berth": False,  # unquoted dots split the path
        'labels."a b"==c': True,
        "labels.'a b'==c": True,
    }
    for text, expected in cases.items():
        assert parse_filters([text]).match_mapping(obj) is expected, text
    field_of = mapping_adaptor(obj)
    assert field_of(("event", "pid")) == ("42", True)
    assert field_of(("event", "ok")) == ("true", True)
    assert field_of(("event", "gone")) == ("", False)
    assert field_of(("event", "nested")) == ("", True)
    assert field_of(("nowhere",)) == ("", False)


def test_quoted_field_path_may_hold_dots_and_spaces() -> None:
    parsed = parse_filters(['labels."a.b c".d==x'])
    seen: list[tuple[str, ...]] = []

    def adaptor(path: Sequence[str]) -> tuple[str, bool]:
        seen.append(tuple(path))
        return "x", True

    assert parsed.match(adaptor)
    assert seen == [("labels", "a.b c", "d")]

