"""connect.http1.exchange without sockets: what an exchange decides on each event, and the
retry policy's conditions and count."""

from __future__ import annotations

import pytest

from connect.cluster import Outcome
from connect.http1.exchange import (
    CLOSE,
    FINISH,
    FORWARD,
    Answer,
    Exchange,
    Retry,
)
from connect.http1_headers import (
    FORBIDDEN,
    FORBIDDEN_CLOSE,
    GATEWAY_TIMEOUT,
    RETRY_ANY,
    RETRY_IDEMPOTENT,
    Framing,
)
from connect.routes import RetryPolicy

NO_BODY = Framing(chunked=False, length=None)
BODY = Framing(chunked=False, length=5, length_line=b"content-length: 5\r\n")


def exchange(
    method: bytes = b"GET", framing: Framing = NO_BODY, retry: RetryPolicy | None = None
) -> Exchange:
    ex = Exchange(method, b"", [], framing, keep_alive=True)
    if retry is not None:
        ex.retry = retry
    return ex


def test_an_ordinary_answer_is_forwarded_and_finished() -> None:
    ex = exchange()
    assert ex.on_response_head(200, b"", may_redo=True, key="a") is FORWARD
    assert ex.resp_started and ex.outcome is Outcome.SUCCESS
    assert ex.on_response_end("a") is FINISH


@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_peer_refusal_any_swallows_the_answer_and_retries_elsewhere(method: bytes) -> None:
    ex = exchange(method)
    assert ex.on_response_head(502, RETRY_ANY, may_redo=True, key="a") == Retry("a")
    assert not ex.resp_started and ex.outcome is Outcome.REFUSED
    assert ex.on_response_end("a") == Retry("a")
    assert ex.tries == 2
    # One retry by default: a second refusal is forwarded as it is.
    assert ex.on_response_head(502, RETRY_ANY, may_redo=True, key="b") is FORWARD


def test_peer_refusal_idempotent_only_retries_idempotent_requests() -> None:
    assert exchange(b"POST").on_response_head(502, RETRY_IDEMPOTENT, True, "a") is FORWARD
    assert exchange(b"PUT").on_response_head(502, RETRY_IDEMPOTENT, True, "a") == Retry("a")


def test_refusal_is_ignored_where_the_listener_does_not_honour_it() -> None:
    # An inbound sidecar's app cannot speak for a peer sidecar.
    assert exchange().on_response_head(502, RETRY_ANY, may_redo=False, key="a") is FORWARD


def test_a_request_with_a_body_or_an_upgrade_is_never_replayed() -> None:
    assert exchange(b"POST", BODY).on_response_head(502, RETRY_ANY, True, "a") is FORWARD
    ex = exchange()
    ex.upgrade = b"websocket"
    assert ex.on_response_head(502, RETRY_ANY, True, "a") is FORWARD
    ex = exchange(b"PUT", BODY)
    assert isinstance(ex.on_upstream_lost("a", signal_retriable=False), Answer)


def test_swallowed_answer_whose_connection_closes_retries_at_once() -> None:
    ex = exchange()
    ex.on_response_head(502, RETRY_ANY, True, "a")
    assert ex.on_upstream_lost("a", signal_retriable=False) == Retry("a")
    assert ex.outcome is Outcome.REFUSED  # what the endpoint is charged with


def test_reset_before_any_answer_retries_an_idempotent_request_once() -> None:
    ex = exchange()
    assert ex.on_upstream_lost("a", signal_retriable=False) == Retry("a")
    assert ex.outcome is Outcome.RESET
    action = ex.on_upstream_lost("b", signal_retriable=False)
    assert isinstance(action, Answer) and action.response.startswith(b"HTTP/1.1 502")
    assert b"x-meshlet-retriable" not in action.response


def test_reset_of_a_post_is_a_502() -> None:
    action = exchange(b"POST").on_upstream_lost("a", signal_retriable=True)
    assert isinstance(action, Answer) and action.response.startswith(b"HTTP/1.1 502")
    # Not idempotent: the inbound sidecar does not tell the caller to try elsewhere.
    assert b"x-meshlet-retriable" not in action.response


def test_inbound_reset_after_its_retry_tells_the_caller_it_may_try_elsewhere() -> None:
    ex = exchange(retry=RetryPolicy(num_retries=0))
    action = ex.on_upstream_lost("app", signal_retriable=True)
    assert isinstance(action, Answer)
    assert b"x-meshlet-retriable: idempotent\r\n" in action.response


def test_loss_after_the_answer_started() -> None:
    ex = exchange()
    ex.on_response_head(200, b"", True, "a")
    assert ex.on_upstream_lost("a", False) is CLOSE and ex.outcome is Outcome.RESET
    ex = exchange()
    ex.on_response_head(200, b"", True, "a")
    ex.resp_until_close = True
    assert ex.on_upstream_lost("a", False) is FINISH


def test_policy_off_means_no_retry() -> None:
    ex = exchange(retry=RetryPolicy(on_reset=False, on_refused=False))
    assert isinstance(ex.on_upstream_lost("a", False), Answer)
    assert (
        exchange(retry=RetryPolicy(on_refused=False)).on_response_head(502, RETRY_ANY, True, "a")
        is FORWARD
    )


def test_num_retries_three_on_status_codes() -> None:
    ex = exchange(retry=RetryPolicy(num_retries=3, on_status=frozenset({503})))
    for n in range(3):
        assert ex.on_response_head(503, b"", True, f"e{n}") == Retry(f"e{n}")
        assert ex.outcome is Outcome.SERVER_ERROR
        assert ex.on_response_end(f"e{n}") == Retry(f"e{n}")
    assert ex.tries == 4
    assert ex.on_response_head(503, b"", True, "e3") is FORWARD
    assert ex.on_response_end("e3") is FINISH


@pytest.mark.parametrize(
    ("policy", "status", "retried"),
    [
        (RetryPolicy(on_5xx=True), 500, True),
        (RetryPolicy(on_5xx=True), 404, False),
        (RetryPolicy(on_gateway_error=True), 504, True),
        (RetryPolicy(on_gateway_error=True), 500, False),
        (RetryPolicy(on_status=frozenset({409})), 409, True),
        (RetryPolicy(), 503, False),
    ],
)
def test_status_conditions(policy: RetryPolicy, status: int, retried: bool) -> None:
    action = exchange(retry=policy).on_response_head(status, b"", True, "a")
    assert (action == Retry("a")) is retried


def test_timeouts() -> None:
    ex = exchange()
    assert ex.on_timeout(None, try_only=False) == Answer(GATEWAY_TIMEOUT)
    assert ex.outcome is Outcome.TIMEOUT
    # A per-try timeout retries only where the policy says so, and only before an answer.
    ex = exchange(retry=RetryPolicy(on_timeout=True))
    assert ex.on_timeout("a", try_only=True) == Retry("a")
    assert ex.on_timeout("b", try_only=True) == Answer(GATEWAY_TIMEOUT)  # retries used up
    ex = exchange(retry=RetryPolicy(on_timeout=True))
    ex.on_response_head(200, b"", True, "a")
    assert ex.on_timeout("a", try_only=True) is CLOSE


def test_retry_policy_refuses_a_negative_count() -> None:
    with pytest.raises(ValueError, match="num_retries"):
        RetryPolicy(num_retries=-1)


def test_denied_request_is_a_403_that_closes_only_when_it_must() -> None:
    ex = exchange()
    assert ex.on_denied() == Answer(FORBIDDEN) and ex.keep_alive
    ex = exchange(b"POST", BODY)
    ex.expect = True  # the client waits for a 100 that will not come
    assert ex.on_denied() == Answer(FORBIDDEN_CLOSE) and not ex.keep_alive
    ex = exchange()
    ex.upgrade = b"websocket"
    assert ex.on_denied() == Answer(FORBIDDEN_CLOSE) and not ex.keep_alive
