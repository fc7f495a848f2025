"""Filter building and escaping, GUIDs, the status table, and reading QRS JSON."""

from __future__ import annotations

from urllib.parse import quote as url_quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtt_starter.core.model import CustomPropertyValue, Selector, SelectorKind, TaskRef, TaskStatus
from mqtt_starter.core.qrs_query import (
    MAX_TERMS_PER_FILTER,
    execution_filter,
    latest_execution,
    normalize_guid,
    parse_execution,
    parse_task,
    percent_encode,
    quote,
    selector_matches,
    task_filters,
)
from mqtt_starter.simulators.qrs.filter_engine import evaluate, parse

HOSTILE = [
    ("plain", "'plain'"),
    ("Q1'25", r"'Q1\'25'"),
    ("x' or name ne '", r"'x\' or name ne \''"),
    ("back\\slash", r"'back\\slash'"),
    ("\\'", r"'\\\''"),
    ("trailing\\", r"'trailing\\'"),
    ("a&b#c+d/e%f", "'a&b#c+d/e%f'"),
    ("Ünïcødé ☃", "'Ünïcødé ☃'"),
    ("'') or (id ne '", r"'\'\') or (id ne \''"),
    ("", "''"),
    ("x" * 1000, "'" + "x" * 1000 + "'"),
]


@pytest.mark.parametrize(("value", "literal"), HOSTILE)
def test_quote_escapes_backslashes_then_quotes(value: str, literal: str) -> None:
    assert quote(value) == literal


@pytest.mark.parametrize(("value", "_literal"), HOSTILE)
def test_quoted_value_matches_only_itself_in_the_simulator_parser(
    value: str, _literal: str
) -> None:
    node = parse(f"tags.name eq {quote(value)}")
    assert evaluate(node, {"tags": [{"name": value}]})
    assert not evaluate(node, {"tags": [{"name": value + "x"}]})
    assert not evaluate(node, {"tags": [{"name": "other"}], "name": value})


@given(st.text(min_size=0, max_size=200))
def test_any_text_quotes_to_a_literal_that_matches_exactly_itself(value: str) -> None:
    node = parse(f"name eq {quote(value)}")
    assert evaluate(node, {"name": value})
    assert not evaluate(node, {"name": value + "'"})


def test_filters_per_selector_kind() -> None:
    selectors = [
        Selector(SelectorKind.ID, " 6CA1C5F2-2742-44D5-8ADF-D6CBA3701A4E "),
        Selector(SelectorKind.TAG, "Nightly"),
        Selector(SelectorKind.CUSTOM_PROPERTY, "tasks2", name="taskGroup"),
        Selector(SelectorKind.NAME, "Reload Sales"),
    ]
    assert task_filters(selectors) == [
        "id eq 6ca1c5f2-2742-44d5-8adf-d6cba3701a4e"
        " or tags.name eq 'Nightly'"
        " or (customProperties.definition.name eq 'taskGroup' and customProperties.value eq"
        " 'tasks2')"
        " or name eq 'Reload Sales'"
    ]


def test_many_selectors_are_chunked_not_one_query_per_task() -> None:
    selectors = [Selector(SelectorKind.TAG, f"t{i}") for i in range(MAX_TERMS_PER_FILTER + 1)]
    filters = task_filters(selectors)
    assert len(filters) == 2
    assert filters[1] == f"tags.name eq 't{MAX_TERMS_PER_FILTER}'"


def test_an_invalid_id_never_reaches_a_filter() -> None:
    with pytest.raises(ValueError, match="not a GUID"):
        task_filters([Selector(SelectorKind.ID, "1 or 1 eq 1")])
    with pytest.raises(ValueError, match="not a GUID"):
        execution_filter("x' or '")


@pytest.mark.parametrize(
    ("text", "guid"),
    [
        ("6ca1c5f2-2742-44d5-8adf-d6cba3701a4e", "6ca1c5f2-2742-44d5-8adf-d6cba3701a4e"),
        ("  6CA1C5F2-2742-44D5-8ADF-D6CBA3701A4E\n", "6ca1c5f2-2742-44d5-8adf-d6cba3701a4e"),
        ("6ca1c5f2274244d58adfd6cba3701a4e", None),
        ("{6ca1c5f2-2742-44d5-8adf-d6cba3701a4e}", None),
        ("6ca1c5f2-2742-44d5-8adf-d6cba3701a4g", None),
        ("", None),
    ],
)
def test_normalize_guid(text: str, guid: str | None) -> None:
    assert normalize_guid(text) == guid


@pytest.mark.parametrize(
    ("code", "name", "terminal"),
    [
        (0, "NeverStarted", False),
        (1, "Triggered", False),
        (2, "Started", False),
        (3, "Queued", False),
        (4, "AbortInitiated", False),
        (5, "Aborting", False),
        (6, "Aborted", True),
        (7, "FinishedSuccess", True),
        (8, "FinishedFail", True),
        (9, "Skipped", True),
        (10, "Retry", False),
        (11, "Error", True),
        (12, "Reset", True),
        (13, "DistributionQueue", False),
        (14, "DistributionRunning", False),
    ],
)
def test_status_table(code: int, name: str, terminal: bool) -> None:
    status = TaskStatus(code)
    assert (status.qrs_name, status.terminal) == (name, terminal)


DECOY = TaskRef(
    id="77777777-7777-4777-8777-777777777777",
    name="CP decoy",
    custom_properties=(
        CustomPropertyValue("taskGroup", "tasks1"),
        CustomPropertyValue("Other", "tasks2"),
    ),
)


def test_custom_property_recheck_needs_name_and_value_on_one_entry() -> None:
    assert not selector_matches(
        Selector(SelectorKind.CUSTOM_PROPERTY, "tasks2", "taskGroup"), DECOY
    )
    assert selector_matches(Selector(SelectorKind.CUSTOM_PROPERTY, "TASKS1", "taskgroup"), DECOY)


def test_tag_and_name_recheck_ignore_case_only() -> None:
    task = TaskRef(id="1" * 8, name="Reload Sales", tags=("Nightly",))
    assert selector_matches(Selector(SelectorKind.TAG, "nightly"), task)
    assert not selector_matches(Selector(SelectorKind.TAG, "Nightly "), task)
    assert selector_matches(Selector(SelectorKind.NAME, "RELOAD SALES"), task)
    assert not selector_matches(Selector(SelectorKind.NAME, "Reload"), task)


def test_parse_full_task() -> None:
    task = parse_task(
        {
            "id": "6CA1C5F2-2742-44D5-8ADF-D6CBA3701A4E",
            "name": "Reload Sales",
            "taskType": 0,
            "enabled": True,
            "tags": [{"id": "t", "name": "Nightly"}],
            "customProperties": [{"value": "tasks2", "definition": {"name": "taskGroup"}}],
            "app": {"id": "a", "name": "Sales"},
            "operational": {
                "lastExecutionResult": {"id": "AAAAAAAA-0000-4000-8000-000000000001", "status": 7}
            },
        }
    )
    assert task == TaskRef(
        id="6ca1c5f2-2742-44d5-8adf-d6cba3701a4e",
        name="Reload Sales",
        task_type=0,
        enabled=True,
        tags=("Nightly",),
        custom_properties=(CustomPropertyValue("taskGroup", "tasks2"),),
        last_status=TaskStatus.FINISHED_SUCCESS,
        app_name="Sales",
        last_result_id="aaaaaaaa-0000-4000-8000-000000000001",
    )


@pytest.mark.parametrize(
    ("task_type", "name"),
    [
        (0, "Reload"),
        (1, "ExternalProgram"),
        (2, "UserSync"),
        (3, "Distribute"),
        (4, "Preload"),
        (9, "type 9"),
    ],
)
def test_task_type_names(task_type: int, name: str) -> None:
    task = parse_task({"id": "6ca1c5f2-2742-44d5-8adf-d6cba3701a4e", "taskType": task_type})
    assert task is not None and task.type_name == name


def test_parse_condensed_task_and_junk_fields() -> None:
    task = parse_task(
        {
            "id": "6CA1C5F2-2742-44D5-8ADF-D6CBA3701A4E",
            "name": "n",
            "tags": "junk",
            "operational": None,
            "taskType": "reload",
            "customProperties": [None, {"value": 1}],
        }
    )
    assert task is not None
    assert (task.id, task.task_type, task.tags) == ("6ca1c5f2-2742-44d5-8adf-d6cba3701a4e", 0, ())
    assert task.custom_properties == (CustomPropertyValue("", ""),)
    assert task.last_status is TaskStatus.NEVER_STARTED


@pytest.mark.parametrize("task_id", [None, 5, "", "x", "6ca1c5f2-2742"])
def test_a_task_without_a_guid_is_no_task(task_id: object) -> None:
    assert parse_task({"id": task_id, "name": "n"}) is None


def test_parse_execution_prefers_error_details_and_hides_never_dates() -> None:
    execution = parse_execution(
        {
            "executionID": "E",
            "taskID": "T",
            "status": 8,
            "startTime": "2026-11-29T10:00:00.000Z",
            "stopTime": "1753-01-01T00:00:00.000Z",
            "duration": 1500,
            "details": [
                {"detailsType": 2, "message": "Changing task state to Triggered"},
                {"detailsType": 0, "message": "Field 'Amount' not found"},
                {"detailsType": 2, "message": "Changing task state from Started to FinishedFail"},
            ],
        }
    )
    assert (execution.execution_id, execution.task_id, execution.status) == (
        "e",
        "t",
        TaskStatus.FINISHED_FAIL,
    )
    assert (execution.start_time, execution.stop_time, execution.duration_ms) == (
        "2026-11-29T10:00:00.000Z",
        None,
        1500,
    )
    assert execution.message == "Field 'Amount' not found"
    assert execution.reason == "Field 'Amount' not found"


def test_details_are_read_in_the_order_of_their_dates() -> None:
    execution = parse_execution(
        {
            "id": "R",
            "status": 8,
            "details": [
                {
                    "detailsType": 0,
                    "message": "second",
                    "detailCreatedDate": "2026-11-29T10:00:02Z",
                },
                {"detailsType": 2, "message": "state", "detailCreatedDate": "2026-11-29T10:00:03Z"},
                {"detailsType": 0, "message": "first", "detailCreatedDate": "2026-11-29T10:00:01Z"},
            ],
        }
    )
    assert (execution.message, execution.reason, execution.result_id) == (
        "second",
        "first\nsecond",
        "r",
    )
    informational = parse_execution(
        {
            "status": 7,
            "details": [
                {"detailsType": 2, "message": "b", "detailCreatedDate": "2026-11-29T10:00:02Z"},
                {"detailsType": 2, "message": "a", "detailCreatedDate": "2026-11-29T10:00:01Z"},
            ],
        }
    )
    assert (informational.message, informational.reason) == ("b", "")


def test_latest_execution_prefers_the_live_retry() -> None:
    failed = parse_execution(
        {"executionID": "e", "status": 8, "startTime": "2026-11-29T10:00:00.000Z"}
    )
    retry = parse_execution({"executionID": "e", "status": 10})
    assert latest_execution([failed, retry]) is retry
    done = parse_execution(
        {"executionID": "e", "status": 7, "startTime": "2026-11-29T10:00:01.000Z"}
    )
    assert latest_execution([failed, done]) is done
    assert latest_execution([]) is None


def test_filters_are_chunked_by_encoded_size_too() -> None:
    from urllib.parse import quote as url_quote

    from mqtt_starter.core.qrs_query import MAX_FILTER_BYTES, MAX_VALUE_LENGTH, too_long

    selectors = [Selector(SelectorKind.TAG, "☃" * MAX_VALUE_LENGTH) for _ in range(6)]
    filters = task_filters(selectors)
    assert len(filters) > 1
    assert all(len(url_quote(f, safe="")) <= MAX_FILTER_BYTES for f in filters)
    assert sum(f.count("tags.name eq") for f in filters) == 6
    assert not too_long(Selector(SelectorKind.TAG, "x" * MAX_VALUE_LENGTH))
    assert too_long(Selector(SelectorKind.CUSTOM_PROPERTY, "v", "n" * (MAX_VALUE_LENGTH + 1)))


@given(st.text() | st.text(alphabet=st.characters(max_codepoint=127)))
def test_percent_encode_writes_what_quote_writes(value: str) -> None:
    assert percent_encode(value) == url_quote(value, safe="")
