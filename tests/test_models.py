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
                      "error", "started_at", "finished_at"}
    assert CompletionResult.from_dict(d) == r


def test_usage_adds_and_keeps_unknown_cost_unknown():
    assert Usage(1, 1, 2) + Usage(2, 2, 4) == Usage(3, 3, 6, None)
    assert (Usage(1, 1, 2, 0.1) + Usage(1, 1, 2)).cost_usd == pytest.approx(0.1)
