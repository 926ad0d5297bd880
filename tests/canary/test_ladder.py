"""One step-ladder rule for the config and for live rollouts, and values read back from Redis that
are not what they claim to be: each is one clear message, never a crash."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from proxy.canary.rollout import RolloutError, RolloutState, check_steps, parse_steps
from proxy.settings import Settings

BAD_LADDERS = [
    ([], "rollout steps must not be empty"),
    ([5.0, 1.0, 100.0], "rollout steps must increase strictly"),
    ([1.0, 1.0, 100.0], "rollout steps must increase strictly"),
    ([0.0, 50.0, 100.0], "rollout steps must be above 0 and end at 100"),
    ([1.0, 50.0], "rollout steps must be above 0 and end at 100"),
    ([1.0, float("nan"), 100.0], "rollout steps must be finite numbers"),
]


@pytest.mark.parametrize(("ladder", "message"), BAD_LADDERS)
def test_config_and_live_rollouts_refuse_the_same_ladders_in_the_same_words(
    ladder: list[float], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(canary={"steps": ladder})
    with pytest.raises(RolloutError, match=message):
        check_steps(ladder)
    if ladder:
        with pytest.raises(RolloutError, match=message):
            parse_steps(",".join(str(step) for step in ladder))


def test_a_sane_ladder_is_taken_by_both() -> None:
    assert Settings(canary={"steps": [1, 50, 100]}).canary.steps == [1.0, 50.0, 100.0]
    assert parse_steps("1, 50,100") == ([1.0, 50.0, 100.0], [])
    assert Settings(canary={"steps": [1, "50!", 100]}).canary.approval_steps == [50.0]


@pytest.mark.parametrize(
    ("raw", "where"),
    [("junk", "value: Invalid JSON"), ("{}", "group: Field required"), ("[1]", "value: Input should be")],
)
def test_a_rollout_state_that_is_not_one_is_one_line_naming_the_field(raw: str, where: str) -> None:
    with pytest.raises(ValueError, match="rollout state in Redis is not valid: " + where) as caught:
        RolloutState.from_json(raw)
    assert "\n" not in str(caught.value)


def test_a_stored_rollout_state_reads_back_equal() -> None:
    state = RolloutState("default", "progressing", [1.0, 100.0], 0, 60.0, 1.0, 2.0, 3.0, seq=4, hold_id=2)
    assert RolloutState.from_json(json.dumps(state.as_dict())) == state


@pytest.mark.parametrize(
    "url", ["http://host:99999", "http://bad host", "http://h/?q=1", "ftp://h", "HTTP://h"]
)
def test_upstream_urls_must_be_http_base_urls(url: str) -> None:
    with pytest.raises(ValidationError, match="must look like http://host:port"):
        Settings(v1_url=url)


def test_an_upstream_base_path_keeps_no_trailing_slash() -> None:
    assert Settings(v2_url="https://v2.internal:8443/api/").v2_url == "https://v2.internal:8443/api"
