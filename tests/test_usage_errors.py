"""Usage errors (an unknown command or option, a missing argument) are one line, as every other
error of the CLI: what is wrong and where the help is, exit 2; typer alone prints four lines."""

from __future__ import annotations

import pytest

from tests.clirun import strangler


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("statu",), "error: No such command 'statu'. Did you mean 'status'? (see: strangler -h)"),
        (("xyzzy",), "error: No such command 'xyzzy'. (see: strangler -h)"),
        (("rolback",), "error: No such command 'rolback'. Did you mean 'rollback'? (see: strangler -h)"),
        (
            ("rollout", "strat"),
            "error: No such command 'strat'. Did you mean 'start', 'status'? (see: strangler rollout -h)",
        ),
        (("parity", "sq"), "error: No such command 'sq'. Did you mean 'sql'? (see: strangler parity -h)"),
        (("--nosuch",), "error: No such option: --nosuch (see: strangler -h)"),
        (("set",), "error: Missing argument 'percentage'. (see: strangler set -h)"),
        (("status", "--nosuch"), "error: No such option: --nosuch (see: strangler status -h)"),
        (("set", "10", "--group"), "error: Option '--group' requires an argument. (see: strangler set -h)"),
        (("rollout", "nosuch"), "error: No such command 'nosuch'. (see: strangler rollout -h)"),
        (
            ("rollout", "start", "--steps"),
            "error: Option '--steps' requires an argument. (see: strangler rollout -h)",
        ),
    ],
)
def test_a_usage_error_is_one_line_exit_2(args: tuple[str, ...], line: str) -> None:
    result = strangler(*args)
    assert (result.returncode, result.stderr.strip(), result.stdout) == (2, line, "")
