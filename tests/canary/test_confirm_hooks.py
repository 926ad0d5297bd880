"""Confirm hooks (Flagger's confirm-promotion) and the webhook events: real HTTP servers on
127.0.0.1, the real Redis, the leader driven by ``tick()`` (tests/canary/test_loop.Rig)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from proxy.canary import events
from proxy.canary.confirm import WAITING
from proxy.canary.notify.dispatch import Dispatcher, make_target
from proxy.canary.rollout import ROLLED_BACK
from proxy.settings import ALERT_KINDS, ConfigError, NotifierTarget, load_settings
from tests.canary.helpers import Blackhole, Receiver, refused_url
from tests.canary.test_loop import Rig, run


class Hook:
    """A confirm hook: answers ``status`` to every POST and keeps the bodies."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.bodies: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.bodies.append(json.loads(body))
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/confirm"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def percentage(rig: Rig) -> float:
    state = await rig.rollouts.get("default")
    assert state is not None
    return state.percentage


def test_a_step_waits_for_every_confirm_hook_to_answer_2xx(redis_url: str) -> None:
    hook, other = Hook(503), Hook(200)

    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [10, 50, 100], 2, "test")
        for _ in range(6):
            await rig.second()
        assert await percentage(rig) == 10
        hold = (await rig.verdict())["step_hold"]
        assert hold == "confirm hook 'db-migrated' answered HTTP 503"
        assert "127.0.0.1" not in hold  # the hook is named, its address is not
        asked = len(hook.bodies)
        assert asked >= 3  # asked again at every check once the step is due
        assert hook.bodies[-1] == {
            "source": "strangler", "kind": "confirm", "group": "default",
            "from_percentage": 10.0, "to_percentage": 50.0, "hold_id": 1,
        }  # fmt: skip
        assert other.bodies == []  # a hook of another group is not asked
        hook.status = 204
        await rig.second()
        assert await percentage(rig) == 50
        assert "step_hold" not in await rig.verdict()

    try:
        run(
            redis_url, body,
            confirm_hooks=[
                {"name": "db-migrated", "url": hook.url},
                {"name": "other", "url": other.url, "groups": ["other"]},
            ],
        )  # fmt: skip
    finally:
        hook.close()
        other.close()


@pytest.mark.parametrize(
    ("where", "reason"),
    [("hang", "did not answer within 0.2s"), ("refused", "unreachable (ConnectError)")],
)
def test_a_hook_that_hangs_or_is_down_holds_the_step(redis_url: str, where: str, reason: str) -> None:
    hole = Blackhole()
    url = hole.url if where == "hang" else refused_url()

    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [10, 50, 100], 2, "test")
        holds = set()
        for _ in range(40):  # the round runs beside the checks: real time passes between them
            await rig.second()
            holds.add((await rig.verdict()).get("step_hold"))
            if f"confirm hook 'gate' {reason}" in holds:
                break
            await asyncio.sleep(0.05)
        assert await percentage(rig) == 10
        assert f"confirm hook 'gate' {reason}" in holds, holds

    try:
        run(redis_url, body, confirm_hooks=[{"name": "gate", "url": url, "timeout_seconds": 0.2}])
    finally:
        hole.close()


def test_a_slow_hook_never_holds_up_the_check_it_is_asked_in(redis_url: str) -> None:
    """A hook that takes its whole 30 s: the check goes on meanwhile (the step waits, saying so)
    and a failing v2 is rolled back while the hook has not answered."""
    hole = Blackhole()

    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [10, 50, 100], 2, "test")
        for _ in range(4):
            await rig.second()
        assert (await rig.verdict())["step_hold"] == WAITING
        for _ in range(4):
            await rig.second(v2_errors=30)
        state = await rig.rollouts.get("default")
        assert state is not None and state.state == ROLLED_BACK
        rig.controller.confirm.cancel()

    try:
        run(redis_url, body, confirm_hooks=[{"name": "slow", "url": hole.url, "timeout_seconds": 30}])
    finally:
        hole.close()


class OddHook:
    """A hook that answers 200 and then an endless body, or bytes that are not HTTP at all."""

    def __init__(self, kind: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/confirm"
        self.kind = kind
        self.stopping = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                if self.kind == "garbage":
                    conn.sendall(b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                while not self.stopping:  # an endless body, 1 MiB a chunk
                    conn.sendall(b"100000\r\n" + b"x" * 0x100000 + b"\r\n")
            except OSError:
                return

    def close(self) -> None:
        self.stopping = True
        self.sock.close()


@pytest.mark.parametrize(("kind", "moves"), [("endless", True), ("garbage", False)])
def test_a_hostile_hook_answer_is_judged_by_its_status_line_only(
    redis_url: str, kind: str, moves: bool
) -> None:
    """An endless 200 body is never read (the step is taken); bytes that are not HTTP hold it."""
    hook = OddHook(kind)

    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [10, 50, 100], 2, "test")
        for _ in range(40):
            await rig.second()
            if await percentage(rig) != 10 or "unreachable" in (await rig.verdict()).get("step_hold", ""):
                break
            await asyncio.sleep(0.05)
        if moves:
            assert await percentage(rig) == 50
        else:
            assert await percentage(rig) == 10
            assert (await rig.verdict())[
                "step_hold"
            ] == "confirm hook 'odd' unreachable (RemoteProtocolError)"

    try:
        run(redis_url, body, confirm_hooks=[{"name": "odd", "url": hook.url, "timeout_seconds": 2}])
    finally:
        hook.close()


def test_hooks_wait_for_the_approval_and_never_block_a_rollback(redis_url: str) -> None:
    hook = Hook(503)

    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [10, 100], 2, "test", [10])
        for _ in range(5):
            await rig.second()
        assert hook.bodies == []  # not asked before the approval
        assert (await rig.verdict())["step_hold"] == "awaiting approval of the hold at 10%"
        await rig.rollouts.approve("default", "alice")
        await rig.second()
        assert len(hook.bodies) == 1 and await percentage(rig) == 10
        for _ in range(4):
            await rig.second(v2_errors=30)
        state = await rig.rollouts.get("default")
        assert state is not None and state.state == ROLLED_BACK and await rig.split() == "0"

    try:
        run(redis_url, body, confirm_hooks=[{"name": "gate", "url": hook.url}])
    finally:
        hook.close()


def test_webhooks_get_every_lifecycle_event_and_targets_choose_theirs(redis_url: str) -> None:
    """start, each step, hold, approve, completion, abort, rollback: a webhook gets them all; a
    target with ``events`` only those; the Slack hold alert carries the approve button."""
    with Receiver() as receiver:

        async def body(rig: Rig) -> None:
            some = ["awaiting_approval", "approved"]
            specs = [
                NotifierTarget(kind="webhook", url=receiver.url + "/all"),
                NotifierTarget(kind="webhook", url=receiver.url + "/some", events=some),
                NotifierTarget(kind="slack", url=receiver.url + "/slack", events=["awaiting_approval"]),
            ]
            dispatcher = Dispatcher([make_target(s) for s in specs], rig.settings.canary, rig.metrics)
            rig.notifier = dispatcher  # type: ignore[assignment]
            rig.new_controller()
            await rig.rollouts.start("default", [10, 25, 100], 1, "test", [25])
            for _ in range(6):
                await rig.second()
            await rig.rollouts.approve("default", "alice")
            for _ in range(4):
                await rig.second()
            assert await percentage(rig) == 100
            await rig.rollouts.start("default", [10, 100], 60, "test")
            await rig.rollouts.abort("default", "test")
            await rig.rollouts.start("default", [10, 100], 60, "test")
            for _ in range(5):
                await rig.second(v2_errors=30)
            await rig.courier.tick()
            await dispatcher.stop()

        run(redis_url, body)
        kinds = [b["event"] for b in receiver.bodies("/all")]
        for kind in (
            "started",
            "step_advanced",
            "awaiting_approval",
            "approved",
            "completed",
            "aborted",
            "rolled_back",
        ):
            assert kind in kinds, (kind, kinds)
        assert sorted(b["event"] for b in receiver.bodies("/some")) == ["approved", "awaiting_approval"]
        (slack,) = receiver.bodies("/slack")
        button = slack["blocks"][1]["elements"][0]
        assert button["action_id"] == "strangler_approve" and button["value"].startswith("approve:default:")


def test_the_settings_event_kinds_are_the_canarys() -> None:
    assert set(ALERT_KINDS) == set(events.KINDS)


@pytest.mark.parametrize(
    ("yaml", "words"),
    [
        (
            "canary:\n  notifiers: [{kind: webhook, url: 'http://h/x', events: [nosuch]}]\n",
            "'nosuch' not among",
        ),
        (
            "canary:\n  notifiers: [{kind: webhook, url: 'http://h/x', events: []}]\n",
            "an empty list not among",
        ),
        ("canary:\n  notifiers: [{kind: webhook, url: 'http://h/x', events: 7}]\n", "events"),
        ("canary:\n  confirm_hooks: [{name: a, url: 'ftp://x'}]\n", "must be an http:// or https:// URL"),
        ("canary:\n  confirm_hooks: [{name: 'a b', url: 'http://x'}]\n", "name"),
        (
            "canary:\n  confirm_hooks: [{name: a, url: 'http://x', timeout_seconds: .nan}]\n",
            "timeout_seconds",
        ),
        ("canary:\n  confirm_hooks: nope\n", "confirm_hooks"),
        ("canary:\n  steps: [1, '25!!', 100]\n", "'25!!' must be a number"),
        ("canary:\n  steps: ['!25', 100]\n", "'!25' must be a number"),
        ("canary:\n  steps: [1, 25, 100]\n  approval_steps: [30]\n", "approval step 30 is not on the ladder"),
        ("canary:\n  slack_approvers: 5\n", "slack_approvers"),
    ],
)
def test_hostile_settings_are_one_line_errors(tmp_path: Path, yaml: str, words: str) -> None:
    path = tmp_path / "strangler.yaml"
    path.write_text(yaml)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert words in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
