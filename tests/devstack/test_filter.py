"""devstack.filter: Consul's ``?filter=`` language (hashicorp/go-bexpr v0.1.2, as Consul pins it).

Where a test asserts an exact message, the source is named: go-bexpr v0.1.2's own test vectors
(grammar_test.go, evaluate_test.go), its validate.go / strconv / regexp/syntax format strings, or
(marked "derived") the grammar's PEG semantics worked through by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devstack.bexpr import (
    BOOL,
    FLOAT64,
    INT,
    STRING,
    UINT8,
    Filter,
    FilterError,
    FilterSchemaError,
    FilterSyntaxError,
    ListOf,
    MapOf,
    compile_filter,
    struct,
)
from devstack.filter_schemas import (
    AGENT_CHECK,
    AGENT_MEMBER,
    AGENT_SERVICE,
    CATALOG_NODE,
    CATALOG_SERVICE_NODE,
    HEALTH_ENTRY,
    NODE_SERVICE,
)

# A schema shaped like go-bexpr's own test types: scalars, a list of scalars, a map, a list of
# structs and a map of structs.
THING = struct(
    Name=STRING,
    Port=INT,
    Enabled=BOOL,
    Ratio=FLOAT64,
    Level=UINT8,
    Tags=ListOf(STRING),
    Meta=MapOf(STRING),
    Items=ListOf(struct(Kind=STRING, Size=INT, Labels=ListOf(STRING))),
    Addrs=MapOf(struct(Host=STRING, Port=INT)),
    Inner=struct(Flag=BOOL, Deep=struct(Value=STRING)),
)


def matches(expression: str, obj: dict[str, Any], schema: Any = THING) -> bool:
    return compile_filter(expression, schema).matches(obj)


def error_of(expression: str, schema: Any = THING) -> FilterError:
    with pytest.raises(FilterError) as caught:
        compile_filter(expression, schema)
    return caught.value


# --------------------------------------------------------------------------------------------
# Syntax errors
# --------------------------------------------------------------------------------------------

# Every error case of go-bexpr v0.1.2 grammar_test.go, input and message verbatim.
GO_BEXPR_GRAMMAR_ERRORS = [
    ('foo == "12x', '1:12 (11): rule "string": Unterminated string literal'),
    ("foo == `12x", '1:12 (11): rule "string": Unterminated string literal'),
    ("foo == 3x", '1:9 (8): rule "number": Invalid number literal'),
    ("foo[3] == abc", '1:5 (4): rule "index": Invalid index'),
    ('x in foo["abc"', '1:15 (14): rule "index": Unclosed index expression'),
    ('foo["abc" == 3', '1:11 (10): rule "index": Unclosed index expression'),
    ("x in 32", '1:6 (5): rule "match": Invalid selector'),
    ("32 == 32", '1:4 (3): no match found, expected: "in", "not" or [ \\t\\r\\n]'),
    ("32 is empty", '1:4 (3): no match found, expected: "in", "not" or [ \\t\\r\\n]'),
    ("x in foo abc", '1:10 (9): no match found, expected: "and", "or", [ \\t\\r\\n] or EOF'),
    (
        "x in foo and ",
        '1:14 (13): no match found, expected: "(", "-", "0", "\\"", "`", "not", [ \\t\\r\\n], '
        "[1-9] or [a-zA-Z]",
    ),
    (
        "x in foo or ",
        '1:13 (12): no match found, expected: "(", "-", "0", "\\"", "`", "not", [ \\t\\r\\n], '
        "[1-9] or [a-zA-Z]",
    ),
    (
        "x in foo or not ",
        '1:17 (16): no match found, expected: "!=", "(", "-", "0", "==", "\\"", "`", "contains", '
        '"in", "is", "matches", "not", [ \\t\\r\\n], [1-9] or [a-zA-Z]',
    ),
    ("(foo == 4", '1:10 (9): rule "grouping": Unmatched parentheses'),
]


@pytest.mark.parametrize(("expression", "message"), GO_BEXPR_GRAMMAR_ERRORS)
def test_syntax_errors_match_go_bexpr_test_vectors(expression: str, message: str) -> None:
    err = error_of(expression)
    assert isinstance(err, FilterSyntaxError)
    assert str(err) == message


# Derived from grammar.peg with pigeon's rules (farthest failure, expected set sorted, "!." shown
# as EOF, rune columns, byte offsets, a newline counted as column 0 of the next line).
DERIVED_SYNTAX_ERRORS = [
    # py-consul's test_catalog.py uses this to provoke an error.
    (
        "not a valid expression((",
        '1:7 (6): no match found, expected: "!=", "==", "contains", "in", "is", "matches", '
        '"not" or [ \\t\\r\\n]',
    ),
    # JSON-pointer selectors arrived in go-bexpr v0.1.5; Consul's v0.1.2 reads a string value.
    ('"/Meta/env" == prod', '1:13 (12): no match found, expected: "in", "not" or [ \\t\\r\\n]'),
    # Bare words are selectors: a hyphen ends them.
    (
        "Meta.env == prod-1",
        '1:17 (16): no match found, expected: ".", "[", [ \\t\\r\\n], [a-zA-Z0-9_] or EOF',
    ),
    # A double-quoted string ends at the first quote, so \" cannot be written; Unquote fails.
    ('Name == "a\\"b"', '1:9 (8): rule "string": invalid syntax'),
    ('Name == "\\q"', '1:9 (8): rule "string": invalid syntax'),
    ('Name == "\\\'"', '1:9 (8): rule "string": invalid syntax'),
    ("(Port == 1 Port)", '1:12 (11): rule "grouping": Unmatched parentheses'),
    (
        "Port == 1 AND Port == 2",
        '1:11 (10): no match found, expected: "and", "or", [ \\t\\r\\n] or EOF',
    ),
    # "not" needs whitespace after it.
    (
        "not(Port == 1)",
        '1:4 (3): no match found, expected: "!=", ".", "==", "[", [ \\t\\r\\n] or [a-zA-Z0-9_]',
    ),
    ("Port == 1 ornot Port == 2", "1:13 (12): no match found, expected: [ \\t\\r\\n]"),
    (
        "Name == 'x'",
        '1:9 (8): no match found, expected: "-", "0", "\\"", "`", [ \\t\\r\\n], [1-9] or [a-zA-Z]',
    ),
    ("Port == 0x1F", '1:10 (9): rule "number": Invalid number literal'),
    ("Port == 1.2.3", '1:12 (11): rule "number": Invalid number literal'),
    ("Port == 01", '1:10 (9): rule "number": Invalid number literal'),
    ('Name == "é', '1:11 (11): rule "string": Unterminated string literal'),
    (
        "Port == 1 and\nName",
        '2:5 (18): no match found, expected: "!=", ".", "==", "[", [ \\t\\r\\n] or [a-zA-Z0-9_]',
    ),
    ('Name == "x"\n\n)', '3:1 (13): no match found, expected: "and", "or", [ \\t\\r\\n] or EOF'),
    (
        "   ",
        '1:4 (3): no match found, expected: "(", "-", "0", "\\"", "`", "not", [ \\t\\r\\n], '
        "[1-9] or [a-zA-Z]",
    ),
    ('Meta[3] == x and Name == "\\q"', '1:6 (5): rule "index": Invalid index'),
]


@pytest.mark.parametrize(("expression", "message"), DERIVED_SYNTAX_ERRORS)
def test_derived_syntax_errors(expression: str, message: str) -> None:
    err = error_of(expression)
    assert isinstance(err, FilterSyntaxError)
    assert str(err) == message


def test_every_recorded_error_is_reported_once_each_in_order() -> None:
    # pigeon keeps every error its predicates and actions record, de-duplicated by text.
    assert str(error_of('Name == "\\q" or Meta[3] == x')) == (
        '1:9 (8): rule "string": invalid syntax\n1:22 (21): rule "index": Invalid index'
    )


def test_empty_expression_is_no_filter_but_blank_is_an_error() -> None:
    assert compile_filter("", THING).matches({})
    assert isinstance(error_of(" "), FilterSyntaxError)


def test_deep_nesting_fails_cleanly_and_long_chains_work() -> None:
    assert matches("(" * 40 + "Port == 1" + ")" * 40, {"Port": 1})
    assert isinstance(error_of("(" * 400 + "Port == 1" + ")" * 400), FilterSyntaxError)
    chain = " or ".join(f"Port == {n}" for n in range(3000))
    assert compile_filter(chain, THING).matches({"Port": 2999})


# --------------------------------------------------------------------------------------------
# Grammar: operators, precedence, values, selectors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("Name == web", True),
        ("Name != web", False),
        ("Name == api", False),
        ("Name != api", True),
        ('"we" in Name', True),
        ('"xy" not in Name', True),
        ("Name contains eb", True),
        ("Name not contains eb", False),
        ('Name matches "^w.b$"', True),
        ('Name not matches "^w"', False),
        ("Tags is empty", False),
        ("Tags is not empty", True),
        ("Port == 80", True),
        ("Enabled == true", True),
        ("Enabled != false", True),
    ],
)
def test_every_operator(expression: str, expected: bool) -> None:
    obj = {"Name": "web", "Port": 80, "Enabled": True, "Tags": ["a"]}
    assert matches(expression, obj) is expected


@pytest.mark.parametrize(
    ("expression", "oracle"),
    [
        ("A and not B or C", lambda a, b, c: (a and not b) or c),
        ("A or B and C", lambda a, b, c: a or (b and c)),
        ("not A or B", lambda a, b, c: (not a) or b),
        ("not A and B", lambda a, b, c: (not a) and b),
        ("not (A or B) and C", lambda a, b, c: not (a or b) and c),
        ("(A or B) and C", lambda a, b, c: (a or b) and c),
        ("A and (not B or C)", lambda a, b, c: a and ((not b) or c)),
        ("not not A", lambda a, b, c: a),
        ("not not not A", lambda a, b, c: not a),
        ("( A or B )", lambda a, b, c: a or b),
        ("\t\r\n A \t\r\n or \t\r\n ( B and C ) \n", lambda a, b, c: a or (b and c)),
    ],
)
def test_precedence_not_over_and_over_or(expression: str, oracle: Any) -> None:
    abc = struct(A=BOOL, B=BOOL, C=BOOL)
    text = expression.replace("A", "A == true").replace("B", "B == true").replace("C", "C == true")
    compiled = compile_filter(text, abc)
    for a, b, c in itertools.product([False, True], repeat=3):
        assert compiled.matches({"A": a, "B": b, "C": c}) is oracle(a, b, c), (a, b, c)


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ('"plain"', "plain"),
        ("`raw\\n`", "raw\\n"),  # backticks: no escapes
        ('"tab\\there"', "tab\there"),
        ('"\\u00e9t\\U0001F600"', "ét\U0001f600"),
        ('"\\x41\\101\\\\"', "AA\\"),
        ('"\\a\\b\\f\\n\\r\\v"', "\a\b\f\n\r\v"),
        ('"with space and ( ) == or"', "with space and ( ) == or"),
        ("bare_word9", "bare_word9"),
        ('sel.path["k"]', "sel.path.k"),  # a selector-shaped value is its dotted form
        ("-12", "-12"),
        ("0.5", "0.5"),
        ('""', ""),
    ],
)
def test_value_forms(literal: str, value: str) -> None:
    assert matches(f"Name == {literal}", {"Name": value})


def test_raw_strings_drop_carriage_returns_like_go_unquote() -> None:
    assert matches("Name == `a\r\nb`", {"Name": "a\nb"})


def test_invalid_utf8_from_hex_escapes_compares_unequal_not_crashing() -> None:
    assert not matches('Name == "\\xff"', {"Name": "ÿ"})


@pytest.mark.parametrize(
    "expression",
    [
        'Meta["my-key"] == v',
        "Meta[`my-key`] == v",
        'Meta[ "my-key" ] == v',
        '"my-key" in Meta',
        'Meta["my-key"] contains v',
    ],
)
def test_index_selectors_reach_keys_that_are_not_identifiers(expression: str) -> None:
    assert matches(expression, {"Meta": {"my-key": "v"}})


def test_selectors_and_keywords_are_case_sensitive() -> None:
    assert str(error_of("name == x")) == 'Selector "name" is not valid'
    assert str(error_of("Name == x OR Port == 1")).startswith("1:11 (10): no match found")


def test_keywords_can_still_be_selectors_and_values() -> None:
    kw = struct(**{"not": STRING, "in": STRING, "and": STRING})
    assert matches("not == or", {"not": "or"}, kw)
    assert matches("and in in", {"in": "band"}, kw)
    assert matches("not not == x", {"not": "y"}, kw)


# --------------------------------------------------------------------------------------------
# Validation against the schema (validate.go / field_config.go)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("Missing == 1", 'Selector "Missing" is not valid'),
        ("Inner.Nope == 1", 'Selector "Inner.Nope" is not valid'),
        ("Inner.Deep.Value.More == 1", 'Selector "Inner.Deep.Value.More" is not valid'),
        ("Name.Sub == 1", 'Selector "Name.Sub" is not valid'),
        ("Meta.a.b == 1", 'Selector "Meta.a.b" is not valid'),
        ('Meta["a.b"].c == 1', 'Selector "Meta.a.b.c" is not valid'),
        ("Tags.x == 1", 'Selector "Tags.x" is not valid'),
        ("Items.Nope == 1", 'Selector "Items.Nope" is not valid'),
        ("Items.Kind.x == 1", 'Selector "Items.Kind.x" is not valid'),
        ('Inner["we ird\\n"] == 1', 'Selector "Inner.we ird\\n" is not valid'),
        # Operators a field's type does not support.
        ("Name is empty", 'Invalid match operator "Is Empty" for selector "Name"'),
        ("Name is not empty", 'Invalid match operator "Is Not Empty" for selector "Name"'),
        ("Port contains 1", 'Invalid match operator "In" for selector "Port"'),
        ("1 not in Port", 'Invalid match operator "Not In" for selector "Port"'),
        ('Port matches "1"', 'Invalid match operator "Matches" for selector "Port"'),
        ("Enabled not matches x", 'Invalid match operator "Not Matches" for selector "Enabled"'),
        ("Tags == a", 'Invalid match operator "Equal" for selector "Tags"'),
        ("Tags matches a", 'Invalid match operator "Matches" for selector "Tags"'),
        ("Meta != a", 'Invalid match operator "Not Equal" for selector "Meta"'),
        ("Items contains a", 'Invalid match operator "In" for selector "Items"'),
        ("Items == a", 'Invalid match operator "Equal" for selector "Items"'),
        ("Inner == a", 'Invalid match operator "Equal" for selector "Inner"'),
        ("Inner is empty", 'Invalid match operator "Is Empty" for selector "Inner"'),
        ("Addrs.lan == a", 'Invalid match operator "Equal" for selector "Addrs.lan"'),
        ("Map in Inner", 'Invalid match operator "In" for selector "Inner"'),
        ("Meta.k is empty", 'Invalid match operator "Is Empty" for selector "Meta.k"'),
    ],
)
def test_schema_errors(expression: str, message: str) -> None:
    err = error_of(expression)
    assert isinstance(err, FilterSchemaError)
    assert str(err) == message


def test_first_invalid_match_in_source_order_is_reported() -> None:
    assert str(error_of("Port == 1 and (Bad == 1 or Worse == 2)")) == 'Selector "Bad" is not valid'
    assert str(error_of("not Tags == a or Bad == 1")) == (
        'Invalid match operator "Equal" for selector "Tags"'
    )


# --------------------------------------------------------------------------------------------
# Coercion of literals to the field's Go type (strconv with base 0)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ("8080", 8080),
        ("-5", -5),
        ('"+5"', 5),
        ('"0x1F"', 31),
        ('"0X1f"', 31),
        ('"0o17"', 15),
        ('"017"', 15),  # a leading zero is octal under base 0
        ('"0b101"', 5),
        ('"1_000"', 1000),
        ('"0x_1F"', 31),
        ('"-9223372036854775808"', -(2**63)),
        ('"9223372036854775807"', 2**63 - 1),
        ("0", 0),
    ],
)
def test_int_coercion_follows_parseint_base_zero(literal: str, value: int) -> None:
    assert matches(f"Port == {literal}", {"Port": value})


@pytest.mark.parametrize(
    ("literal", "reason"),
    [
        ("abc", 'strconv.ParseInt: parsing "abc": invalid syntax'),
        ("1.5", 'strconv.ParseInt: parsing "1.5": invalid syntax'),
        ('"08"', 'strconv.ParseInt: parsing "08": invalid syntax'),
        ('"1__0"', 'strconv.ParseInt: parsing "1__0": invalid syntax'),
        ('"_1"', 'strconv.ParseInt: parsing "_1": invalid syntax'),
        ('"+"', 'strconv.ParseInt: parsing "+": invalid syntax'),
        ('""', 'strconv.ParseInt: parsing "": invalid syntax'),
        ('" 1"', 'strconv.ParseInt: parsing " 1": invalid syntax'),
        (
            '"9223372036854775808"',
            'strconv.ParseInt: parsing "9223372036854775808": value out of range',
        ),
        (
            '"-9223372036854775809"',
            'strconv.ParseInt: parsing "-9223372036854775809": value out of range',
        ),
        # Overflow is noticed at the digit that causes it, before the junk after it.
        (
            '"99999999999999999999x"',
            'strconv.ParseInt: parsing "99999999999999999999x": value out of range',
        ),
    ],
)
def test_int_coercion_errors(literal: str, reason: str) -> None:
    raw = json.loads(literal) if literal.startswith('"') else literal
    err = error_of(f"Port == {literal}")
    assert isinstance(err, FilterSchemaError)
    quoted = json.dumps(raw)
    assert str(err) == f'Failed to coerce value {quoted} for selector "Port": {reason}'


@pytest.mark.parametrize(
    ("literal", "value"),
    [(spelling, True) for spelling in ("true", "True", "TRUE", "t", "T", "1")]
    + [(spelling, False) for spelling in ("false", "False", "FALSE", "f", "F", "0")],
)
def test_bool_coercion_follows_parsebool(literal: str, value: bool) -> None:
    assert matches(f"Enabled == {literal}", {"Enabled": value})
    assert not matches(f"Enabled == {literal}", {"Enabled": not value})


def test_bool_coercion_error() -> None:
    assert str(error_of("Enabled == yes")) == (
        'Failed to coerce value "yes" for selector "Enabled": '
        'strconv.ParseBool: parsing "yes": invalid syntax'
    )


def test_uint_coercion_and_range() -> None:
    assert matches('Level == "0xff"', {"Level": 255})
    assert str(error_of("Level == 256")) == (
        'Failed to coerce value "256" for selector "Level": '
        'strconv.ParseUint: parsing "256": value out of range'
    )
    assert str(error_of("Level == -1")) == (
        'Failed to coerce value "-1" for selector "Level": '
        'strconv.ParseUint: parsing "-1": invalid syntax'
    )


def test_float_coercion() -> None:
    assert matches("Ratio == 0.5", {"Ratio": 0.5})
    assert matches('Ratio == "1e3"', {"Ratio": 1000.0})
    assert matches('Ratio == "0x1p-2"', {"Ratio": 0.25})
    assert matches('Ratio != "NaN"', {"Ratio": float("nan")})  # NaN equals nothing, as in Go
    assert str(error_of('Ratio == "1e999"')) == (
        'Failed to coerce value "1e999" for selector "Ratio": '
        'strconv.ParseFloat: parsing "1e999": value out of range'
    )
    assert "invalid syntax" in str(error_of('Ratio == "1.2.3"'))


def test_string_fields_accept_any_literal_and_containers_coerce_their_elements() -> None:
    assert matches("Name == 42", {"Name": "42"})
    assert matches("Name == true", {"Name": "true"})
    assert matches("42 in Meta", {"Meta": {"42": ""}})
    assert (
        str(error_of("x in Items.Size")) == 'Invalid match operator "In" for selector "Items.Size"'
    )


# --------------------------------------------------------------------------------------------
# Evaluation over rendered JSON (evaluate.go)
# --------------------------------------------------------------------------------------------

OBJ: dict[str, Any] = {
    "Name": "web",
    "Tags": ["v1", "primary"],
    "Meta": {"version": "1.2", "empty": ""},
    "Items": [
        {"Kind": "disk", "Size": 10, "Labels": ["ssd"]},
        {"Kind": "net", "Size": 0, "Labels": []},
    ],
    "Addrs": {"lan": {"Host": "10.0.0.1", "Port": 80}},
}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        # "in" is substring on strings, membership on lists, key presence on maps.
        ('"eb" in Name', True),
        ('"" in Name', True),
        ('"v1" in Tags', True),
        ('"v" in Tags', False),
        ('"version" in Meta', True),
        ('"1.2" in Meta', False),
        ('"1." in Meta.version', True),
        # Through a list of structs: true when any element matches.
        ("Items.Kind == net", True),
        ("Items.Kind == tape", False),
        # ...so != is "some element differs", not "no element equals".
        ("Items.Kind != net", True),
        ("not Items.Kind == net", False),
        ("Items.Labels contains ssd", True),
        ("Items.Labels is empty", True),
        ("Items.Labels is not empty", True),
        ("Items.Size == 0", True),
        ('Items.Kind matches "^n"', True),
        # Map values, dotted or indexed, including maps of structs.
        ("Meta.version == 1.2", True),  # a number literal's raw text, coerced to a string
        ('Meta.version == "1.2"', True),
        ("Meta.empty == ``", True),
        ("Addrs.lan.Port == 80", True),
        ('Addrs["lan"].Host contains "10."', True),
        # Absent keys of a map: go-bexpr answers without looking further.
        ("Meta.nope == x", False),
        ("Meta.nope != x", True),
        ("x in Meta.nope", False),
        ("x not in Meta.nope", True),
        ('Meta.nope matches "x"', True),  # sic: evaluate.go's default branch
        ('Meta.nope not matches "x"', True),
        ("Addrs.wan.Port == 0", False),
        ("Addrs.wan.Port != 0", True),
        ("Addrs is not empty", True),
        ("Meta is empty", False),
    ],
)
def test_evaluation_semantics(expression: str, expected: bool) -> None:
    assert matches(expression, OBJ) is expected


def test_empty_lists_match_nothing_for_either_polarity() -> None:
    objs: list[dict[str, Any]] = [{"Items": []}, {"Items": None}, {}]
    for obj in objs:
        assert not matches("Items.Kind == a", obj)
        assert not matches("Items.Kind != a", obj)
        assert matches("Items is empty", obj)
        assert not matches("a in Items.Labels", obj)


def test_absent_struct_fields_read_as_go_zero_values() -> None:
    for obj in ({}, {"Inner": None, "Name": None, "Tags": None, "Meta": None}):
        assert matches('Name == ""', obj)
        assert matches("Port == 0", obj)
        assert matches("Enabled == false", obj)
        assert matches("Ratio == 0", obj)
        assert matches("Tags is empty", obj)
        assert matches("Meta is empty", obj)
        assert matches("Inner.Flag == false", obj)
        assert matches("Inner.Deep.Value == ``", obj)
        assert not matches('"" in Tags', obj)


def test_matches_searches_anywhere_like_go_regexp_match() -> None:
    assert matches('Name matches "e"', {"Name": "web"})
    assert not matches('Name matches "^e"', {"Name": "web"})


# --------------------------------------------------------------------------------------------
# Regular expressions: RE2 syntax and RE2's rejections
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("regexp", "value", "expected"),
    [
        ("b$", "ab\n", False),  # Go's $ is end of text unless (?m); Python's also before \n
        ("(?m)b$", "ab\nc", True),
        ("^a\\z", "a", True),
        ("\\d", "\u0663", False),  # ASCII digits only, like RE2
        ("\\w+", "é", False),
        ("\\s", "\v", False),
        ("[[:alpha:]]+$", "abc", True),
        ("[[:digit:]]", "x", False),
        ("(?i)WEB", "web", True),
        ("a(?i)B|c", "C", True),  # flags last to the end of the group, across |
        ("a(?i)B|c", "aB", True),
        ("(a(?i)b)C", "aBc", False),
        ("\\Qa.b\\E", "a.b", True),
        ("\\Qa.b\\E", "axb", False),
        ("\\x{e9}", "é", True),
        ("(?P<name>w)e", "we", True),
        ("(?<name>w)e", "we", True),
        ("a{2}", "aa", True),
        ("a{01}", "a{01}", True),  # not a repeat in RE2: literal braces
        ("^*a", "a", True),
        ("(?s)a.b", "a\nb", True),
        ("a.b", "a\nb", False),
        ("[^a]", "\n", True),
        ("\\bweb\\b", "éweb", True),  # ASCII word boundary
        ("\\_", "_", True),
        # Go unions ranges with complemented sets inside brackets, ASCII-exactly.
        ("[[:^digit:]]", "5", False),
        ("^[\\D5]+$", "5a5", True),
        ("^[\\D]$", "\u0663", True),
        ("^[^\\d_]$", "_", False),
        ("^[^\\d_]$", "a", True),
        ("^[^\\W\\D]$", "5", True),
        ("^[^\\W\\D]$", "b", False),
        # \Q..\E pushes separate literals, so * repeats only the last one.
        ("^\\Qab\\E*$", "abbb", True),
        ("^\\Qab\\E*$", "abab", False),
    ],
)
def test_go_regexp_semantics(regexp: str, value: str, expected: bool) -> None:
    expression = f"Name matches `{regexp}`"
    assert matches(expression, {"Name": value}) is expected


@pytest.mark.parametrize(
    ("regexp", "go_error"),
    [
        ("(?=a)", "invalid or unsupported Perl syntax: `(?=`"),
        ("(?!a)", "invalid or unsupported Perl syntax: `(?!`"),
        ("(?<=a)b", "invalid named capture: `(?<=a)b`"),
        ("(?<!a)b", "invalid named capture: `(?<!a)b`"),
        ("(?>a)", "invalid or unsupported Perl syntax: `(?>`"),
        ("(?#c)", "invalid or unsupported Perl syntax: `(?#`"),
        ("(?i-)", "invalid or unsupported Perl syntax: `(?i-)`"),
        ("(a)\\1", "invalid escape sequence: `\\1`"),
        ("\\Z", "invalid escape sequence: `\\Z`"),
        ("\\q", "invalid escape sequence: `\\q`"),
        ("[\\b]", "invalid escape sequence: `\\b`"),
        ("a\\", "trailing backslash at end of expression: ``"),
        ("a**", "invalid nested repetition operator: `**`"),
        ("a*+", "invalid nested repetition operator: `*+`"),
        ("a+?*", "invalid nested repetition operator: `+?*`"),
        ("*a", "missing argument to repetition operator: `*`"),
        ("(+)", "missing argument to repetition operator: `+`"),
        ("a|?", "missing argument to repetition operator: `?`"),
        ("a{1001}", "invalid repeat count: `{1001}`"),
        ("a{2,1}", "invalid repeat count: `{2,1}`"),
        ("[z-a]", "invalid character class range: `z-a`"),
        ("[[:nope:]]", "invalid character class range: `[:nope:]`"),
        ("[abc", "missing closing ]: `[abc`"),
        ("x(a", "missing closing ): `x(a`"),
        ("a)b", "unexpected ): `a)b`"),
        ("(?P<1-x>a)", "invalid named capture: `(?P<1-x>`"),
        ("(?<", "invalid or unsupported Perl syntax: `(?<`"),
        ("\\x{zz}", "invalid escape sequence: `\\x{z`"),
        ("\\x{}", "invalid escape sequence: `\\x{}`"),
        ("\\x{110000}", "invalid escape sequence: `\\x{110000`"),
        ("\\xZ1", "invalid escape sequence: `\\xZ1`"),
        ("[[:^nope:]]", "invalid character class range: `[:^nope:]`"),
    ],
)
def test_regexps_re2_rejects_fail_with_go_messages(regexp: str, go_error: str) -> None:
    err = error_of(f"Name matches `{regexp}`")
    assert isinstance(err, FilterSchemaError)
    quoted = json.dumps(regexp)
    assert str(err) == (
        f"Failed to compile regular expression {quoted}: error parsing regexp: {go_error}"
    )


def test_valid_re2_that_python_cannot_express_is_refused_honestly() -> None:
    assert "not supported by the devstack" in str(error_of("Name matches `\\pL`"))
    assert "not supported by the devstack" in str(error_of("Name matches `(?U)a+`"))


# --------------------------------------------------------------------------------------------
# Consul's schemas
# --------------------------------------------------------------------------------------------

# The selectors Consul documents for each filtered endpoint (catalog, health, agent), one
# per line, each with an operator its field type supports.
DOCUMENTED_SELECTORS: dict[str, tuple[Any, str]] = {
    "AGENT_SERVICE": (
        AGENT_SERVICE,
        """
        Address == x
        Connect.Native == true
        EnableTagOverride == false
        ID == x
        Kind == x
        Meta is empty
        Meta.k == x
        Port == 1
        Proxy.DestinationServiceID == x
        Proxy.DestinationServiceName == x
        Proxy.LocalServiceAddress == x
        Proxy.LocalServicePort == 1
        Proxy.Mode == x
        Proxy.TransparentProxy.OutboundListenerPort == 1
        Proxy.MeshGateway.Mode == x
        Proxy.Upstreams is empty
        Proxy.Upstreams.Datacenter == x
        Proxy.Upstreams.DestinationName == x
        Proxy.Upstreams.DestinationNamespace == x
        Proxy.Upstreams.DestinationType == x
        Proxy.Upstreams.LocalBindAddress == x
        Proxy.Upstreams.LocalBindPort == 1
        Proxy.Upstreams.MeshGateway.Mode == x
        Service == x
        TaggedAddresses is empty
        TaggedAddresses.k.Address == x
        TaggedAddresses.k.Port == 1
        x in Tags
        Weights.Passing == 1
        Weights.Warning == 1
        """,
    ),
    "AGENT_CHECK": (
        AGENT_CHECK,
        """
        CheckID == x
        Name == x
        Node == x
        Notes == x
        Output == x
        ServiceID == x
        ServiceName == x
        x in ServiceTags
        Status == x
        Type == x
        """,
    ),
    "CATALOG_NODE": (
        CATALOG_NODE,
        """
        Address == x
        Datacenter == x
        ID == x
        Meta is empty
        Meta.k == x
        Node == x
        TaggedAddresses is empty
        TaggedAddresses.k == x
        """,
    ),
    "CATALOG_SERVICE_NODE": (
        CATALOG_SERVICE_NODE,
        """
        Address == x
        Datacenter == x
        ID == x
        Node == x
        NodeMeta is empty
        NodeMeta.k == x
        ServiceAddress == x
        ServiceConnect.Native == true
        ServiceEnableTagOverride == true
        ServiceID == x
        ServiceKind == x
        ServiceMeta is empty
        ServiceMeta.k == x
        ServiceName == x
        ServicePort == 1
        ServiceProxy.DestinationServiceID == x
        ServiceProxy.DestinationServiceName == x
        ServiceProxy.LocalServiceAddress == x
        ServiceProxy.LocalServicePort == 1
        ServiceProxy.Mode == x
        ServiceProxy.TransparentProxy.OutboundListenerPort == 1
        ServiceProxy.TransparentProxy.DialedDirectly == true
        ServiceProxy.MeshGateway.Mode == x
        ServiceProxy.Upstreams.DestinationName == x
        ServiceTaggedAddresses.k.Address == x
        ServiceTaggedAddresses.k.Port == 1
        x in ServiceTags
        ServiceWeights.Passing == 1
        ServiceWeights.Warning == 1
        TaggedAddresses is empty
        TaggedAddresses.k == x
        """,
    ),
    "HEALTH_ENTRY": (
        HEALTH_ENTRY,
        """
        Checks is empty
        Checks.CheckID == x
        Checks.Name == x
        Checks.Node == x
        Checks.Notes == x
        Checks.Output == x
        Checks.ServiceID == x
        Checks.ServiceName == x
        x in Checks.ServiceTags
        Checks.Status == x
        Checks.Type == x
        Node.Address == x
        Node.Datacenter == x
        Node.ID == x
        Node.Meta is empty
        Node.Meta.k == x
        Node.Node == x
        Node.TaggedAddresses is empty
        Node.TaggedAddresses.k == x
        Service.Address == x
        Service.Connect.Native == true
        Service.EnableTagOverride == true
        Service.ID == x
        Service.Kind == x
        Service.Meta is empty
        Service.Meta.k == x
        Service.Port == 1
        Service.Proxy.DestinationServiceID == x
        Service.Proxy.DestinationServiceName == x
        Service.Proxy.LocalServiceAddress == x
        Service.Proxy.LocalServicePort == 1
        Service.Proxy.Mode == x
        Service.Proxy.MeshGateway.Mode == x
        Service.Proxy.Upstreams is empty
        Service.Proxy.Upstreams.DestinationName == x
        Service.Service == x
        Service.TaggedAddresses is empty
        Service.TaggedAddresses.k.Address == x
        Service.TaggedAddresses.k.Port == 1
        x in Service.Tags
        Service.Weights.Passing == 1
        Service.Weights.Warning == 1
        """,
    ),
    "AGENT_MEMBER": (
        AGENT_MEMBER,
        """
        Name == x
        Port == 8301
        Status == 1
        Tags.role == consul
        role in Tags
        Addr is not empty
        127 in Addr
        ProtocolCur == 2
        DelegateMax == 5
        """,
    ),
}


@pytest.mark.parametrize(
    ("schema", "expression"),
    [
        (schema, line.strip())
        for schema, lines in DOCUMENTED_SELECTORS.values()
        for line in lines.splitlines()
        if line.strip()
    ],
)
def test_documented_selectors_compile(schema: Any, expression: str) -> None:
    compile_filter(expression, schema)


@pytest.mark.parametrize(
    ("schema", "selector"),
    [
        # Fields Consul hides from bexpr (bexpr:"-") or that its types do not have.
        (AGENT_SERVICE, "Datacenter"),
        (AGENT_SERVICE, "ContentHash"),
        (AGENT_SERVICE, "CreateIndex"),
        (AGENT_SERVICE, "Namespace"),
        (AGENT_SERVICE, "Proxy.Config"),
        (AGENT_SERVICE, "Proxy.Upstreams.Config"),
        (AGENT_SERVICE, "Connect.SidecarService"),
        (AGENT_CHECK, "Definition"),
        (AGENT_CHECK, "ModifyIndex"),
        (CATALOG_SERVICE_NODE, "ServiceLocality"),
        (CATALOG_NODE, "Locality"),
        (HEALTH_ENTRY, "Checks.Definition"),
        (HEALTH_ENTRY, "Service.Locality"),
    ],
)
def test_hidden_fields_are_not_selectable(schema: Any, selector: str) -> None:
    assert str(error_of(f"{selector} == x", schema)) == f'Selector "{selector}" is not valid'


def test_check_start_time_is_selectable_but_supports_no_operator() -> None:
    assert str(error_of("LastCheckStartTime == x", AGENT_CHECK)) == (
        'Invalid match operator "Equal" for selector "LastCheckStartTime"'
    )


def test_member_fields_have_serf_types() -> None:
    member = {"Name": "n1", "Addr": "127.0.0.1", "Port": 8301, "Tags": {"role": "consul"}}
    assert matches("127 in Addr and 1 in Addr and 2 not in Addr", member, AGENT_MEMBER)
    assert matches("Addr is empty", {"Addr": ""}, AGENT_MEMBER)
    assert "ParseUint" in str(error_of("Port == 70000", AGENT_MEMBER))
    assert "ParseUint" in str(error_of("ProtocolMin == 256", AGENT_MEMBER))


# --------------------------------------------------------------------------------------------
# Examples from py-consul 1.8.0's tests and Consul's docs, on rendered objects
# --------------------------------------------------------------------------------------------

SERF_CHECK = {
    "Node": "dev",
    "CheckID": "serfHealth",
    "Name": "Serf Health Status",
    "Status": "passing",
    "Notes": "",
    "Output": "Agent alive and reachable",
    "ServiceID": "",
    "ServiceName": "",
    "ServiceTags": [],
    "Type": "",
}


def health_entry(service_id: str, tags: list[str], status: str) -> dict[str, Any]:
    check = {
        **SERF_CHECK,
        "CheckID": f"service:{service_id}",
        "Status": status,
        "ServiceID": service_id,
        "ServiceName": "foo",
        "ServiceTags": tags,
        "Type": "ttl",
    }
    return {
        "Node": {
            "ID": "4f7a",
            "Node": "dev",
            "Address": "127.0.0.1",
            "Datacenter": "dc1",
            "TaggedAddresses": {"lan": "127.0.0.1"},
            "Meta": {"consul-network-segment": ""},
        },
        "Service": {
            "ID": service_id,
            "Service": "foo",
            "Tags": tags,
            "Address": "",
            "Meta": {},
            "Port": 0,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
        },
        "Checks": [SERF_CHECK, check],
    }


def test_py_consul_health_filters() -> None:
    entries = [
        health_entry("foo:1", ["tag:foo:1"], "critical"),
        health_entry("foo:2", ["tag:foo:2"], "passing"),
    ]

    def ids(expression: str) -> list[str]:
        compiled = compile_filter(expression, HEALTH_ENTRY)
        return [e["Service"]["ID"] for e in entries if compiled.matches(e)]

    assert ids('"tag:foo:1" in Service.Tags') == ["foo:1"]
    assert ids('"tag:does:not:exist" in Service.Tags') == []
    assert ids("Node.Node != `` ") == ["foo:1", "foo:2"]
    # Consul's docs: any check critical.
    assert ids("Checks.Status == critical") == ["foo:1"]
    assert ids("Checks.Status != passing") == ["foo:1"]
    assert ids("not Checks.Status != passing") == ["foo:2"]


def test_py_consul_check_filters() -> None:
    check = {**SERF_CHECK, "CheckID": "service:foobar", "ServiceID": "foobar"}
    for expression, expected in [
        ('CheckID == "service:foobar"', True),
        ('CheckID == "does-not-exist"', False),
        ('ServiceID == "foobar"', True),
        ('Node == "dev"', True),
        ('Node == "does-not-exist"', False),
        ("Status == `passing`", True),
    ]:
        assert compile_filter(expression, AGENT_CHECK).matches(check) is expected


def test_py_consul_catalog_and_agent_filters() -> None:
    node = {
        "ID": "x",
        "Node": "n-filter-1",
        "Address": "10.1.10.31",
        "Datacenter": "dc1",
        "TaggedAddresses": {"lan": "10.1.10.31"},
        "Meta": {},
    }
    assert matches('Node == "n-filter-1"', node, CATALOG_NODE)
    instance = {
        "Node": "n-filter-1",
        "ServiceName": "web",
        "ServiceTags": ["prod"],
        "ServiceMeta": {},
        "ServiceProxy": {},
        "ServiceConnect": {},
    }
    assert matches('"prod" in ServiceTags', instance, CATALOG_SERVICE_NODE)
    assert not matches(
        '"prod" in ServiceTags', {**instance, "ServiceTags": ["staging"]}, CATALOG_SERVICE_NODE
    )
    assert matches('Service == "web"', {"ID": "web", "Service": "web"}, NODE_SERVICE)
    assert matches(
        '"keep-me" in Tags', {"Service": "filtered-foo", "Tags": ["keep-me"]}, AGENT_SERVICE
    )
    # Consul's docs examples.
    assert matches("Meta.env == qa", {"Meta": {"env": "qa"}}, AGENT_SERVICE)
    assert matches(
        'ServiceMeta.version == "1.0" and ServiceName == api',
        {"ServiceName": "api", "ServiceMeta": {"version": "1.0"}},
        CATALOG_SERVICE_NODE,
    )
    assert matches('NodeMeta.os == "Linux"', {"NodeMeta": {"os": "Linux"}}, CATALOG_SERVICE_NODE)


def test_upstream_selection_through_a_proxy_list() -> None:
    proxy = {
        "Kind": "connect-proxy",
        "Proxy": {
            "DestinationServiceName": "web",
            "Upstreams": [
                {"DestinationName": "db", "LocalBindPort": 9191},
                {"DestinationName": "cache", "LocalBindPort": 9292},
            ],
        },
    }
    assert matches("Proxy.Upstreams.DestinationName == cache", proxy, AGENT_SERVICE)
    assert matches("Proxy.Upstreams.LocalBindPort == 9191", proxy, AGENT_SERVICE)
    assert not matches("Proxy.Upstreams is empty", proxy, AGENT_SERVICE)
    assert matches("Proxy.Upstreams is empty", {"Kind": ""}, AGENT_SERVICE)
    assert matches(
        'Kind == "connect-proxy" and Proxy.DestinationServiceName == web', proxy, AGENT_SERVICE
    )


# --------------------------------------------------------------------------------------------
# The API object
# --------------------------------------------------------------------------------------------


def test_errors_are_value_errors_and_filters_are_immutable() -> None:
    assert issubclass(FilterSyntaxError, FilterError)
    assert issubclass(FilterSchemaError, FilterError)
    assert issubclass(FilterError, ValueError)
    compiled = compile_filter("Port == 1", THING)
    assert isinstance(compiled, Filter)
    assert compiled.expression == "Port == 1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        compiled.expression = "Port == 2"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

SMALL = st.sampled_from(["", "a", "b", "ab"])
NUMBER = st.integers(0, 2)

ATOMS = st.one_of(
    SMALL.map(lambda s: f'Name == "{s}"'),
    SMALL.map(lambda s: f"Name != `{s}`"),
    SMALL.map(lambda s: f'"{s}" in Name'),
    SMALL.map(lambda s: f"Name matches `^{s}`"),
    NUMBER.map(lambda n: f"Port == {n}"),
    NUMBER.map(lambda n: f"Port != {n}"),
    st.sampled_from(["Enabled == true", "Enabled != true", "Tags is empty", "Meta is not empty"]),
    SMALL.map(lambda s: f'"{s}" in Tags'),
    SMALL.map(lambda s: f'"{s}" not in Meta'),
    SMALL.map(lambda s: f"Meta.a == `{s}`"),
    SMALL.map(lambda s: f"Meta.b != `{s}`"),
    SMALL.map(lambda s: f"Items.Kind == `{s}`"),
    SMALL.map(lambda s: f"Items.Kind != `{s}`"),
    SMALL.map(lambda s: f"Items.Labels contains `{s}`"),
)

EXPRESSIONS = st.recursive(
    ATOMS,
    lambda inner: st.one_of(
        st.builds("({}) and ({})".format, inner, inner),
        st.builds("{} or {}".format, inner, inner),
        st.builds("not ({})".format, inner),
        st.builds("( {} )".format, inner),
    ),
    max_leaves=8,
)

OBJECTS = st.fixed_dictionaries(
    {},
    optional={
        "Name": SMALL,
        "Port": NUMBER,
        "Enabled": st.booleans(),
        "Tags": st.lists(SMALL, max_size=3),
        "Meta": st.dictionaries(st.sampled_from(["a", "b"]), SMALL, max_size=2),
        "Items": st.lists(
            st.fixed_dictionaries({}, optional={"Kind": SMALL, "Labels": st.lists(SMALL)}),
            max_size=3,
        ),
    },
)


@settings(max_examples=300, deadline=None)
@given(EXPRESSIONS, EXPRESSIONS, OBJECTS)
def test_boolean_structure_is_respected(left: str, right: str, obj: dict[str, Any]) -> None:
    a = matches(left, obj)
    b = matches(right, obj)
    assert matches(f"not ({left})", obj) is (not a)
    assert matches(f"({left})", obj) is a
    assert matches(f"({left}) and ({right})", obj) is (a and b)
    assert matches(f"({left}) or ({right})", obj) is (a or b)
    assert matches(f"not (({left}) and ({right}))", obj) is matches(
        f"not ({left}) or not ({right})", obj
    )


# Fragments of the language, so random sequences reach validation, coercion and regexps, not
# only the first syntax error.
TOKENS = [
    *["Name", "Port", "Tags", "Meta", "Items", "Items.Kind", "Meta.a", 'Meta["x y"]', "Level"],
    *["Inner.Deep.Value", "Enabled", "Ratio", "==", "!=", "in", "not", "and", "or", "is"],
    *["empty", "contains", "matches", "(", ")", '"a"', "`b`", "1", "-2", "0.5", "3x", "256"],
    *['"\\q"', '"(?=a)"', "`[z-a]`", "`(?i)a|b`", '"1e999"', "[", "]", '"', "`", "\n"],
]


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40) | st.lists(st.sampled_from(TOKENS), max_size=9).map(" ".join))
def test_any_input_compiles_or_raises_filter_error(expression: str) -> None:
    with contextlib.suppress(FilterError):
        compile_filter(expression, THING).matches(OBJ)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="()[]{}*+?|\\^$.-:aAbPp<>=!#0123456789dDwWsSzZQExiUm_,é\n", max_size=12))
def test_any_regexp_compiles_or_raises_filter_error(regexp: str) -> None:
    with contextlib.suppress(FilterError):
        compile_filter(f"Name matches `{regexp}`", THING).matches({"Name": "a1_b\nc"})


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters='"', codec="utf-8")))
def test_double_quoted_literals_round_trip_go_escapes(text: str) -> None:
    # JSON's escapes (\" aside, which the grammar cannot carry) are a subset of Go's.
    literal = json.dumps(text, ensure_ascii=False)
    assert matches(f"Name == {literal}", {"Name": text})


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="`\r", codec="utf-8")))
def test_backtick_literals_are_taken_verbatim(text: str) -> None:
    assert matches(f"Name == `{text}`", {"Name": text})


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**63), 2**63 - 1))
def test_every_int64_spelling_coerces_to_the_same_value(value: int) -> None:
    sign = "-" if value < 0 else ""
    magnitude = abs(value)
    for spelling in (
        str(value),
        f"{sign}{magnitude:#x}",
        f"{sign}{magnitude:#o}",
        f"{sign}{magnitude:#b}",
    ):
        assert matches(f'Port == "{spelling}"', {"Port": value}), spelling
