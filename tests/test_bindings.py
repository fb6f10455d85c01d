"""The bindings parser: every message of the contract, word for word."""

from __future__ import annotations

import json

import pytest
import taskcluster

from quart_events.bindings import (
    MISSING,
    NEED_FIELDS,
    NOT_ARRAY,
    NOT_JSON,
    ONE_KEY,
    Binding,
    BindingError,
    Limits,
    parse_bindings,
)


def parse(value: object, limits: Limits | None = None) -> list[Binding]:
    return parse_bindings(json.dumps(value), limits)


def error_of(raw: str | None, limits: Limits | None = None) -> str:
    with pytest.raises(BindingError) as caught:
        parse_bindings(raw, limits)
    return str(caught.value)


def test_contract_messages_are_the_originals() -> None:
    assert ONE_KEY == "The json query should have only one key i.e. `bindings`."
    assert NOT_ARRAY == "Bindings must be an array of {exchange, routingKeyPattern}"
    assert NEED_FIELDS == "Binding must include `exchange` and `routingKeyPattern` fields"
    assert "`bindings` query parameter is required" in MISSING
    assert "`bindings`" in NOT_JSON and "not valid JSON" in NOT_JSON


def test_valid_bindings() -> None:
    value = {
        "bindings": [
            {"exchange": "exchange/a", "routingKeyPattern": "x.*.#"},
            {"exchange": "exchange/b", "routingKeyPattern": ""},
        ]
    }
    assert parse(value) == [Binding("exchange/a", "x.*.#"), Binding("exchange/b", "")]


def test_empty_array_is_allowed() -> None:
    assert parse({"bindings": []}) == []


def test_extra_fields_in_a_binding_are_ignored() -> None:
    value = {
        "bindings": [
            {
                "exchange": "e",
                "routingKeyPattern": "#",
                "routingKeyReference": [{"name": "taskId"}],
                "foo": 1,
            }
        ]
    }
    assert parse(value) == [Binding("e", "#")]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, MISSING),
        ("", MISSING),
        ("{", NOT_JSON),
        ("undefined", NOT_JSON),
        ('{"bindings": NaN}', NOT_JSON),
        ("[" * 100_000 + "]" * 100_000, NOT_JSON),
        ("null", ONE_KEY),
        ('"bindings"', ONE_KEY),
        ('["bindings"]', ONE_KEY),
        ("{}", ONE_KEY),
        ('{"bindings": [], "x": 1}', ONE_KEY),
        ('{"Bindings": []}', ONE_KEY),
        ('{"bindings": null}', NOT_ARRAY),
        ('{"bindings": "e"}', NOT_ARRAY),
        ('{"bindings": {"exchange": "e", "routingKeyPattern": "#"}}', NOT_ARRAY),
        ('{"bindings": [{"exchange": "e"}]}', NEED_FIELDS),
        ('{"bindings": [{"routingKeyPattern": "#"}]}', NEED_FIELDS),
        ('{"bindings": ["e"]}', NEED_FIELDS),
        ('{"bindings": [null]}', NEED_FIELDS),
        ('{"bindings": [{"exchange": "e", "routingKey": "#"}]}', NEED_FIELDS),
    ],
)
def test_original_messages(raw: str | None, message: str) -> None:
    assert error_of(raw) == message


@pytest.mark.parametrize(
    ("binding", "message"),
    [
        ({"exchange": 1, "routingKeyPattern": "#"}, "bindings[1]: `exchange` must be a string"),
        ({"exchange": None, "routingKeyPattern": "#"}, "bindings[1]: `exchange` must be a string"),
        (
            {"exchange": "e", "routingKeyPattern": ["#"]},
            "bindings[1]: `routingKeyPattern` must be a string",
        ),
        ({"exchange": "", "routingKeyPattern": "#"}, "bindings[1]: `exchange` must not be empty"),
        (
            {"exchange": "e" * 128, "routingKeyPattern": "#"},
            "bindings[1]: `exchange` is longer than 127 characters",
        ),
        (
            {"exchange": "exchange/ü", "routingKeyPattern": "#"},
            "bindings[1]: `exchange` may hold only letters, digits, spaces and -_.:@#,/+",
        ),
        (
            {"exchange": "exchange/a*b", "routingKeyPattern": "#"},
            "bindings[1]: `exchange` may hold only letters, digits, spaces and -_.:@#,/+",
        ),
        (
            {"exchange": "e", "routingKeyPattern": "é" * 128},
            "bindings[1]: `routingKeyPattern` is longer than 255 bytes",
        ),
        (
            {"exchange": "amq.topic", "routingKeyPattern": "#"},
            "bindings[1]: exchange `amq.topic` is not allowed",
        ),
        (
            {"exchange": "amq.rabbitmq.trace", "routingKeyPattern": "#"},
            "bindings[1]: exchange `amq.rabbitmq.trace` is not allowed",
        ),
    ],
)
def test_checks_beyond_the_original_name_the_binding(
    binding: dict[str, object], message: str
) -> None:
    good = {"exchange": "exchange/ok", "routingKeyPattern": "#"}
    assert error_of(json.dumps({"bindings": [good, binding]})) == message


def test_names_at_the_limits_pass() -> None:
    exchange = "exchange/A-z_0.9:@#,/+ " + "e" * 104
    assert len(exchange) == 127
    assert parse({"bindings": [{"exchange": exchange, "routingKeyPattern": "k" * 255}]})


def test_too_many_bindings() -> None:
    value = {"bindings": [{"exchange": "e", "routingKeyPattern": str(i)} for i in range(4)]}
    assert error_of(json.dumps(value), Limits(max_bindings=3)) == (
        "Too many bindings: 4 given, at most 3 allowed"
    )
    assert len(parse(value, Limits(max_bindings=4))) == 4


def test_allow_list() -> None:
    limits = Limits(allowed_exchanges=("exchange/taskcluster-*",), denied_exchanges=("amq.*",))
    assert parse(
        {"bindings": [{"exchange": "exchange/taskcluster-queue/v1/x", "routingKeyPattern": "#"}]},
        limits,
    )
    raw = json.dumps({"bindings": [{"exchange": "exchange/other", "routingKeyPattern": "#"}]})
    assert error_of(raw, limits) == "bindings[0]: exchange `exchange/other` is not allowed"


def test_bindings_built_by_the_taskcluster_client_are_accepted() -> None:
    events = taskcluster.QueueEvents({"rootUrl": "https://tc.example.com"})
    built = [
        events.taskCompleted({"taskId": "fN1kYkcFQXKUBy2dSlZ4XA"}),
        events.taskDefined({"taskGroupId": "abc"}),
        events.taskFailed("primary.#"),
    ]
    # The JS client adds the reference of the routing key to each binding.
    built[0]["routingKeyReference"] = [
        {"name": "routingKeyKind", "constant": "primary", "multipleWords": False},
        {"name": "taskId", "multipleWords": False},
        {"name": "reserved", "multipleWords": True},
    ]
    parsed = parse({"bindings": built})
    assert parsed[0] == Binding(
        "exchange/taskcluster-queue/v1/task-completed",
        "primary.fN1kYkcFQXKUBy2dSlZ4XA.*.*.*.*.*.*.*.#",
    )
    assert [b.exchange for b in parsed[1:]] == [
        "exchange/taskcluster-queue/v1/task-defined",
        "exchange/taskcluster-queue/v1/task-failed",
    ]


def the_issues_costly_patterns(count: int = 100) -> dict[str, list[dict[str, str]]]:
    """100 bindings of the shape ``a.*.a.*...#.a.#.a...`` (240 bytes each): accepted once,
    they made one 128-word key take 102 ms to match for a single stream."""
    patterns = []
    for n in range(count):
        head = ".".join("a" if (n >> (i % 7)) & 1 else "*" for i in range(60))  # distinct
        tail = ".".join("#" if (i + n) % 3 == 0 else "a" for i in range(60))
        patterns.append(f"{head}.{tail}"[:240].rstrip("."))
    return {"bindings": [{"exchange": "exchange/x", "routingKeyPattern": p} for p in patterns]}


def test_a_stream_holds_a_bounded_number_of_pattern_words() -> None:
    value = the_issues_costly_patterns()
    words = sum(len(b["routingKeyPattern"].split(".")) for b in value["bindings"])
    message = error_of(json.dumps(value))
    assert message.startswith("Too many routing-key words: ")
    assert message.endswith(" given in all, at most 2000 allowed")
    assert 2000 < int(message.split(": ")[1].split()[0]) <= words
    # As many as the bound allows pass; equal bindings count once.
    assert parse(the_issues_costly_patterns(16))
    assert parse({"bindings": the_issues_costly_patterns(16)["bindings"] * 6})
    small = Limits(max_words=3)
    assert parse({"bindings": [{"exchange": "e", "routingKeyPattern": "a.*.#"}]}, small)
    assert error_of(
        json.dumps({"bindings": [{"exchange": "e", "routingKeyPattern": "a.*.b.#"}]}), small
    ) == ("Too many routing-key words: 4 given in all, at most 3 allowed")


def test_a_hundred_taskcluster_bindings_fit_in_the_word_bound() -> None:
    events = taskcluster.QueueEvents({"rootUrl": "https://tc.example.com"})
    built = [events.taskCompleted({"taskId": f"task{n:018d}"}) for n in range(100)]
    assert len(parse({"bindings": built})) == 100
