import pytest

from ksi_host import CompletionRequest, CompletionResult, Usage, ValidationError
from ksi_host.models import Attempt


def test_prompt_is_shorthand_for_one_user_message():
    r = CompletionRequest.from_dict({"model": "m", "prompt": "hi"})
    assert r.messages == ({"role": "user", "content": "hi"},)
    assert r.priority == "normal" and len(r.request_id) == 32


@pytest.mark.parametrize(
    "data, field",
    [
        ({"prompt": "hi"}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "prompt": "x", "messages": []}, "prompt"),
        ({"model": "m", "prompt": "x", "priority": "urgent"}, "priority"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "m", "prompt": "x", "timeout_s": -1}, "timeout_s"),
        ({"model": "m", "prompt": "x", "session_id": 5}, "session_id"),
        ({"model": "m", "prompt": "x", "metadata": {"a": [1]}}, "metadata.a"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "m", "prompt": "x", "client_id": "a"}, "client_id"),
        ({"model": "", "prompt": "x"}, "model"),
    ],
)
def test_bad_input_names_the_field(data, field):
    with pytest.raises(ValidationError) as e:
        CompletionRequest.from_dict(data)
    assert e.value.field == field
    assert field in str(e.value)


def test_not_an_object():
    with pytest.raises(ValidationError, match="request: must be a JSON object"):
        CompletionRequest.from_dict([1, 2])


def test_validation_error_at_line():
    e = ValidationError("model", "is required").at_line(7)
    assert str(e) == "line 7: model: is required" and e.line == 7


def test_result_round_trips_through_json_form():
    r = CompletionResult("r1", "ok", text="t", model="m", provider="p", session_id="s",
                         usage=Usage(1, 2, 3, 0.5), attempts=(Attempt(1, "p", latency_ms=1.0),),
                         started_at=1700000000.25, finished_at=1700000001.5)
    d = r.to_dict()
    assert d["started_at"] == "2023-11-14T22:13:20.250Z"
    assert set(d) == {"request_id", "status", "text", "model", "provider", "session_id", "usage", "attempts",
                      "error", "started_at", "finished_at", "message", "finish_reason", "submitted_at"}
    assert CompletionResult.from_dict(d) == r


def test_usage_adds_and_keeps_unknown_cost_unknown():
    assert Usage(1, 1, 2) + Usage(2, 2, 4) == Usage(3, 3, 6, None)
    assert (Usage(1, 1, 2, 0.1) + Usage(1, 1, 2)).cost_usd == pytest.approx(0.1)


def test_request_ids_are_uuid7_time_ordered_unique_and_differ_in_a_forked_child():
    import os
    import uuid

    from ksi_host.models import new_request_id

    ids = [new_request_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    u = uuid.UUID(ids[0])
    assert u.version == 7 and u.variant == uuid.RFC_4122
    assert [i[:12] for i in ids] == sorted(i[:12] for i in ids)  # the millisecond prefix never goes back
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child's generator is seeded again: it must not repeat the parent's next ids
        os.write(write, " ".join(new_request_id() for _ in range(50)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = {i[12:] for i in os.read(read, 1 << 16).decode().split()}
    assert len(child) == 50 and not child & {new_request_id()[12:] for _ in range(50)}


def test_a_timeout_is_bounded_and_the_error_says_so_in_words():
    with pytest.raises(ValidationError, match=r"timeout_s: must be a positive number of seconds, at most 2592000 \(30 days\)"):
        CompletionRequest.from_dict({"model": "m", "prompt": "hi", "timeout_s": 2**63})
    assert CompletionRequest.from_dict({"model": "m", "prompt": "hi", "timeout_s": 30 * 86400}).timeout_s == 30 * 86400


def test_an_unknown_field_whose_name_is_not_unicode_is_named_escaped() -> None:
    # found by hypothesis: a key holding a lone surrogate made an error message that could not be written out
    with pytest.raises(ValidationError) as e:
        CompletionRequest.from_dict({"\ud800": 1, "model": "m", "prompt": "hi"})
    assert e.value.field == "\\ud800" and "unknown field" in e.value.message
    e.value.message.encode("utf-8")


def test_an_unknown_key_of_a_message_whose_name_is_not_unicode_is_named_escaped() -> None:
    # found by fuzzing ksi-host serve: the key reached the field name, whose error could not be written out (the
    # server answered 500; ksi-host run stopped on the line as on a programming error)
    with pytest.raises(ValidationError) as e:
        CompletionRequest.from_dict({"model": "m", "messages": [{"role": "user", "content": "hi", "\ud800": 1}]})
    assert e.value.field == "messages[0].\\ud800" and "unknown key" in e.value.reason
    e.value.message.encode("utf-8")
    with pytest.raises(ValidationError) as e:  # any field or reason built from what a caller sent
        raise ValidationError("tools[0].\udfff", "why \ud800")
    assert (e.value.field, e.value.reason) == ("tools[0].\\udfff", "why \\ud800")
    e.value.message.encode("utf-8")


def test_a_misspelt_field_is_named_with_the_field_it_is_close_to():
    with pytest.raises(ValidationError) as e:
        CompletionRequest.from_dict({"model": "m", "promt": "hi"})
    assert e.value.field == "promt" and e.value.message.startswith("promt: unknown field, did you mean 'prompt'? (known: agent_id,")
    with pytest.raises(ValidationError) as e:
        CompletionRequest.from_dict({"model": "m", "prompt": "hi", "colour": "red"})
    assert e.value.message.startswith("colour: unknown field (known: agent_id,")  # nothing close: no guess
