"""containerd's filter syntax for snapshot List/Walk (snapshotter.filters).

The cases follow containerd 1.6's filters/filter_test.go and scanner_test.go, with the test
corpus turned into snapshots (its "other" field becomes "parent") and the error strings kept as
containerd prints them.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from snapshotter.filters import Filter, FilterError, parse_filters, snapshot_fields


@dataclass(frozen=True)
class Snap:
    name: str
    parent: str = ""
    kind: str = "committed"
    labels: Mapping[str, str] = field(default_factory=dict)

    def fields(self):
        return snapshot_fields(self.name, self.parent, self.kind, self.labels)


CORPUS = [
    Snap("foo", labels={"foo": "true"}),
    Snap("bar", kind="active"),
    Snap("foo", labels={"foo": "present", "more complex label": "present"}),
    Snap("bar", labels={"bar": "true"}),
    Snap("fooer", kind="view", labels={'more complex label with \\ and "': "present"}),
    Snap("fooer", labels={'more complex label with \\ and ".post': "present"}),
    Snap("baz", parent="too complex, yo", kind="active"),
    Snap("bazo", parent="abc"),
    Snap("compound", labels={"foo": "omg_asdf.asdf-qwer"}),
]
EVERYTHING = list(range(len(CORPUS)))


def matching(filters: list[str]) -> list[int]:
    matcher = parse_filters(filters)
    return [i for i, snap in enumerate(CORPUS) if matcher.match(snap.fields())]


def parse_error(text: str) -> FilterError:
    with pytest.raises(FilterError) as caught:
        parse_filters([text])
    return caught.value


# --- matching, containerd's cases --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", EVERYTHING),
        ("name", EVERYTHING),
        ("labels.foo", [0, 2, 8]),
        ("labels.foo,name", [0, 2, 8]),
        ("labels.foo==true", [0]),
        ("labels.foo==omg_asdf.asdf-qwer", [8]),
        ("name==bar", [1, 3]),
        ("name!=bar", [0, 2, 4, 5, 6, 7, 8]),
        ("name==bar,labels.bar", [3]),
        ('parent=="too complex, yo"', [6]),
        ("parent~=[abc]+,name!=foo", [6, 7]),
        ("parent~=/[abc]+/,name!=foo", [6, 7]),
        ("parent~=/[abc]{1,2}/,name!=foo", [6, 7]),
        ('parent~=/[abc]{0,1}"\\//,name!=foo', []),
        ("name==bar,labels.bar==true", [3]),
        ("name==bar,labels.bar==wrong", []),
        ('name==foo,labels."more complex label"', [2]),
        (r'labels."more complex label with \\ and \""==present', [4]),
        (r'labels."more complex label with \\ and \"".post==present', [5]),
    ],
)
def test_containerd_filter_cases(text: str, expected: list[int]) -> None:
    assert matching([text]) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "labels.|foo|==omg_asdf.asdf-qwer",
            "filters: parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: "
            "invalid quote encountered",
        ),
        (
            r'labels.?"more complex label with \\ and \"".post==present',
            r'filters: parse error: [labels. >|?|< "more complex label with \\ and \"".post'
            "==present]: expected field or quoted",
        ),
        ("name==foo,", "filters: parse error: [name==foo,]: expected field or quoted"),
        ("labels.", "filters: parse error: [labels.]: expected field or quoted"),
        (
            "image~=,id?=?fbaq",
            "filters: parse error: [image~= >|,|< id?=?fbaq]: expected value or quoted",
        ),
        (
            "labels.ns/key==value",
            "filters: parse error: [labels.ns >|/|< key==value]: quoted literal not terminated",
        ),
        (
            "labels.key==/value",
            "filters: parse error: [labels.key== >|/|< value]: quoted literal not terminated",
        ),
    ],
)
def test_containerd_error_messages(text: str, message: str) -> None:
    assert str(parse_error(text)) == message


# --- malformed filters: position and what was expected -----------------------------------------


@pytest.mark.parametrize(
    ("text", "position", "reason"),
    [
        ("name==", 6, "expected value or quoted"),
        ("==foo", 0, "expected field or quoted"),
        (",name", 0, "expected field or quoted"),
        ("name,,kind", 5, "expected field or quoted"),
        ("name=foo", 4, 'unsupported operator "="'),
        ("name===foo", 4, 'unsupported operator "==="'),
        ("name foo", 5, 'expected an operator ("=="|"!="|"~=")'),
        ("name?foo", 4, 'expected an operator ("=="|"!="|"~=")'),
        ("name==.foo", 6, "expected value or quoted"),
        ("name~=.", 6, "expected value or quoted"),  # a leading "." separates, even here
        ("name==foo bar", 9, "unexpected input: ' '"),
        ("name==foo ", 9, "unexpected input: ' '"),  # containerd rejects trailing space too
        ('name=="foo"bar', 11, "unexpected input: 'b'"),
        ("   ", 3, "expected field or quoted"),
        ('labels."foo==bar', 7, "quoted literal not terminated"),
        ('name=="foo', 6, "quoted literal not terminated"),
        ('labels."a\nb"==c', 7, "quoted literal not terminated"),
        ("name~=/foo", 6, "quoted literal not terminated"),
        ("name~=|foo", 6, "quoted literal not terminated"),
        ("name==/foo/", 6, "invalid quote encountered"),
        ("name==|foo|", 6, "invalid quote encountered"),
        ('labels."\\g"', 7, "illegal escape sequence"),
        ('labels."\\xaz"', 7, "illegal numeric escape sequence"),
        ('labels."\\/"', 7, "illegal escape sequence"),  # \/ only inside /.../
        ('labels."\\400"==x', 7, "unquoting failed: octal escape \\400 is larger than 255"),
        ("name\x00", 4, "unexpected null"),
        ('labels."a\x00b"', 7, "unexpected null"),
    ],
)
def test_malformed_filter(text: str, position: int, reason: str) -> None:
    error = parse_error(text)
    assert isinstance(error, ValueError)
    assert (error.text, error.position, error.reason) == (text, position, reason)
    assert reason in str(error)


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("name~=[", 6),
        ("name~=(a", 6),
        ("name~=a**", 6),
        ("name~=/x{2,1}/", 6),
        ("name==foo,parent~=/(/", 18),
        ("name~=a{99999999999}", 6),
        ("name~=" + "(" * 5000 + ")" * 5000, 6),
        ("name~=[[:alpha:]]", 6),  # RE2 syntax that Python's re would misread
        ("name~=\\pL", 6),  # RE2 syntax that Python's re lacks
    ],
)
def test_invalid_regexp_is_rejected_when_parsing(text: str, position: int) -> None:
    error = parse_error(text)
    assert error.position == position
    assert error.reason.startswith("invalid regular expression: ")


def test_long_input_is_shortened_in_the_message() -> None:
    text = "name==" + "a" * 1000 + " " + "b" * 1000
    error = parse_error(text)
    assert error.position == 1006
    assert str(error) == (
        f"filters: parse error: [...{'a' * 80} >| |< {'b' * 80}...]: unexpected input: ' '"
    )
    assert len(str(parse_error("labels." * 1000))) < 200


def test_syntax_error_wins_over_an_earlier_invalid_regexp() -> None:
    # containerd only compiles regexps when matching, so it reports the syntax error.
    assert parse_error("name~=(,kind==").reason == "expected value or quoted"


def test_one_bad_string_rejects_the_whole_list() -> None:
    error = parse_error_in_list(["name==foo", "name=="])
    assert error.text == "name=="


def parse_error_in_list(filters: list[str]) -> FilterError:
    with pytest.raises(FilterError) as caught:
        parse_filters(filters)
    return caught.value


def test_a_bare_string_is_refused() -> None:
    with pytest.raises(TypeError):
        parse_filters("name==foo")  # type: ignore[arg-type]


# --- values, quoting and escapes -----------------------------------------------------------------


def matches(text: str, snap: Snap) -> bool:
    return parse_filters([text]).match(snap.fields())


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('labels.v=="a, b c"', "a, b c"),
        (r'labels.v=="tab\there"', "tab\there"),
        (r'labels.v=="quote\" backslash\\"', 'quote" backslash\\'),
        (r'labels.v=="\a\b\f\n\r\v"', "\a\b\f\n\r\v"),
        (r'labels.v=="\u00e9\U0001F600"', "é😀"),
        (r'labels.v=="\xc3\xa9"', "é"),  # \x escapes are bytes, as in Go
        (r'labels.v=="\101\102"', "AB"),
        ('labels.v==""', ""),
        ("labels.v==punctuated_value.foo-bar", "punctuated_value.foo-bar"),
        ("labels.v==a=b", "a=b"),
        ("labels.v==牛", "牛"),
        ("labels.v==`foo`", "`foo`"),  # backquotes are not quotes in containerd's scanner
        ("labels.v=='foo'", "'foo'"),  # nor are single quotes
        ("labels.v == x", "x"),
        ("labels.v ==x", "x"),
    ],
)
def test_value_syntax(text: str, value: str) -> None:
    assert matches(text, Snap("s", labels={"v": value}))
    assert not matches(text, Snap("s", labels={"v": value + "~"}))


def test_escaped_bytes_that_are_not_utf8_match_nothing() -> None:
    assert not matches(r'labels.v=="\xff"', Snap("s", labels={"v": "\xff"}))
    assert not matches(r'labels.v=="\xff"', Snap("s", labels={"v": "\ufffd"}))


def test_white_space_between_selectors() -> None:
    snap = Snap("foo", labels={"a": "1"})
    assert matches("name == foo, labels.a", snap)
    assert matches("  name==foo,\tlabels.a==1", snap)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('labels."containerd.io/gc.root"', "containerd.io/gc.root"),
        ("labels.a.b==c", "a.b"),  # the rest of the path is joined with dots
        ('labels."a.b"==c', "a.b"),
        ('labels.a."b.c".d==c', "a.b.c.d"),
        ('labels."with space"==c', "with space"),
        (r'labels."\u00e9"==c', "é"),
        ("labels.0==c", "0"),
        ('labels.""==c', ""),
        ("labels==c", ""),
    ],
)
def test_label_keys(text: str, key: str) -> None:
    assert matches(text, Snap("s", labels={key: "c"}))
    assert not matches(text, Snap("s", labels={key + "x": "c"}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name~=^fo", [0, 2, 4, 5]),
        ("name~=o$", [0, 2, 7]),
        ("name~=^(foo|bar)$", [0, 1, 2, 3]),
        ("name~=/^ba[rz]$/", [1, 3, 6]),
        ("name~=|a|", [1, 3, 6, 7]),
        (r"parent~=/too\/complex/", []),
        (r"parent~=/\\w+, \\w+$/", [6]),  # Go escapes are undone first: \\w is \w
        (r"parent~=\w+,name!=foo", [6, 7]),  # unquoted, nothing is undone
        ('parent~="\\\\w, yo$"', [6]),  # a "..." value is unquoted before it is compiled
        ("labels.foo~=^$", [1, 3, 4, 5, 6, 7]),  # an absent label has the value ""
        ("labels.foo~=/./", [0, 2, 8]),
    ],
)
def test_regexp_matching(text: str, expected: list[int]) -> None:
    assert matching([text]) == expected


def test_regexp_with_slashes_in_a_slash_quoted_value() -> None:
    # Inside /.../ a slash is escaped as \/ and a regexp backslash must be doubled.
    text = r"name~=/^k8s\\.io\/\\d+\//"
    assert matches(text, Snap("k8s.io/12/sha256:abc"))
    assert not matches(text, Snap("k8sxio/12/sha256:abc"))


def test_regexp_classes_are_ascii_as_in_re2() -> None:
    assert not matches(r"name~=^\d+$", Snap("٣"))
    assert matches(r"name~=^\d+$", Snap("3"))


# --- semantics: operators, disjunction, the snapshot adaptor -------------------------------------


def test_not_equal_matches_absent_fields() -> None:
    assert matching(["labels.foo!=true"]) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_filter_strings_are_ored() -> None:
    assert matching(["name==foo", "name==bar"]) == [0, 1, 2, 3]
    assert matching(["name==foo,labels.foo==true", "parent==abc"]) == [0, 7]
    assert matching(["name==nothing", "name==nobody"]) == []


def test_no_filters_or_an_empty_string_matches_everything() -> None:
    assert matching([]) == EVERYTHING
    assert matching([""]) == EVERYTHING
    assert matching(["name==nothing", ""]) == EVERYTHING
    assert matching(()) == EVERYTHING


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind==committed", [0, 2, 3, 5, 7, 8]),
        ("kind==active", [1, 6]),
        ("kind==view", [4]),
        ("kind!=committed", [1, 4, 6]),
        ("kind~=^(active|view)$", [1, 4, 6]),
        ("kind", EVERYTHING),
    ],
)
def test_kind(text: str, expected: list[int]) -> None:
    assert matching([text]) == expected


def test_parent_is_present_even_when_empty() -> None:
    # As in containerd's adaptor: `parent` alone matches all, `parent==""` the roots.
    assert matching(["parent"]) == EVERYTHING
    assert matching(['parent==""']) == [0, 1, 2, 3, 4, 5, 8]


def test_snapshot_fields() -> None:
    fields = snapshot_fields("n", "p", "Committed", {"a.b": "1", "c": ""})
    assert fields(["kind"]) == ("committed", True)
    assert fields(["name"]) == ("n", True)
    assert fields(["parent"]) == ("p", True)
    assert fields(["labels", "a", "b"]) == ("1", True)
    assert fields(["labels", "a.b"]) == ("1", True)
    assert fields(["labels", "c"]) == ("", True)
    assert fields(["labels", "missing"]) == ("", False)
    assert fields(["size"]) == ("", False)
    assert fields([]) == ("", False)
    assert snapshot_fields("n", "", "unknown", {})(["kind"]) == ("", False)
    assert snapshot_fields("n", "", "view", {})(["labels", "c"]) == ("", False)


def test_present_label_with_empty_value() -> None:
    assert matches("labels.c", Snap("s", labels={"c": ""}))
    assert matches('labels.c==""', Snap("s", labels={"c": ""}))
    assert not matches('labels.c==""', Snap("s", labels={"d": ""}))


# --- robustness --------------------------------------------------------------------------------

SAMPLE = Snap("foo", parent="bar", kind="active", labels={"a.b": "c", "": "", "é": "\n"})

# Characters that steer the scanner into its less travelled paths.
SYNTAX = st.sampled_from([*"\"/|\\.,=!~ \t\n\x00`'[](){}*+?^$", "\\x", "\\u", "\\U", "\\0"])
FILTERISH = st.lists(
    st.one_of(SYNTAX, st.sampled_from(["name", "labels", "kind", "parent", "a", "1"])),
    max_size=20,
).map("".join)


def parse_or_error(text: str) -> None:
    try:
        matcher = parse_filters([text])
    except FilterError as error:
        assert 0 <= error.position <= len(text)
        return
    assert isinstance(matcher, Filter)
    assert isinstance(matcher.match(SAMPLE.fields()), bool)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # re warns about e.g. "[[" in a set
@settings(max_examples=500)
@given(st.text())
@example("labels.\ud800")
@example('labels."\ud800"')
@example("name~=\ud800")
@example(r'name~="\xff"')
def test_arbitrary_text_parses_or_raises_filter_error(text: str) -> None:
    parse_or_error(text)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@settings(max_examples=1000)
@given(FILTERISH)
def test_filter_like_text_parses_or_raises_filter_error(text: str) -> None:
    parse_or_error(text)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@given(st.lists(FILTERISH, max_size=4))
def test_lists_of_filters_parse_or_raise_filter_error(texts: list[str]) -> None:
    try:
        matcher = parse_filters(texts)
    except FilterError:
        return
    assert isinstance(matcher.match(SAMPLE.fields()), bool)


def go_quote(text: str) -> str:
    """A Go double-quoted string literal for text."""
    escaped = []
    for ch in text:
        if ch in '"\\':
            escaped.append("\\" + ch)
        elif ch.isprintable():
            escaped.append(ch)
        else:
            escaped.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(escaped) + '"'


LABEL_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)


@given(LABEL_TEXT, LABEL_TEXT)
def test_quoted_label_key_and_value_round_trip(key: str, value: str) -> None:
    snap = Snap("s", labels={key: value})
    assert matches(f"labels.{go_quote(key)}=={go_quote(value)}", snap)
    assert not matches(f"labels.{go_quote(key)}!={go_quote(value)}", snap)
    assert matches(f"labels.{go_quote(key)}", snap)
    assert not matches(f"labels.{go_quote(key + 'x')}", snap)
