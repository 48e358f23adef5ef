"""`modeldeploy run` refuses nonsense settings, naming the flag and the value."""

from __future__ import annotations

import pytest

from modeldeploy_operator import cli


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [
        ("--metrics-interval", "0", "'0' must be greater than 0"),
        ("--metrics-window", "-5", "'-5' must be greater than 0"),
        ("--leader-election-lease-seconds", "abc", "'abc' is not a number"),
        ("--leader-election-lease-seconds", "2.5", "'2.5' must be a whole number"),
    ],
)
def test_bad_numbers_are_refused(
    flag: str, value: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", flag, value])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert flag in error and problem in error
