"""`modeldeploy run` settings: flags and MODELDEPLOY_* variables are validated alike, once."""

from __future__ import annotations

import importlib.metadata

import pytest

from modeldeploy_cli import main
from modeldeploy_operator import cli, settings

BAD = [
    ("--metrics-interval", "0", "greater than 0"),
    ("--metrics-window", "-5", "greater than 0"),
    ("--leader-election-lease-seconds", "abc", "valid integer"),
    ("--leader-election-lease-seconds", "2.5", "valid integer"),
    ("--health-port", "70000", "less than or equal to 65535"),
]


@pytest.mark.parametrize(("flag", "value", "problem"), BAD)
def test_bad_flags_are_refused_naming_flag_and_value(
    flag: str, value: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main.main(["run", flag, value])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert flag in error and problem in error and repr(value) in error


@pytest.mark.parametrize(("flag", "value", "problem"), BAD)
def test_bad_environment_is_refused_like_the_flag(
    flag: str,
    value: str,
    problem: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    variable = "MODELDEPLOY_" + flag.removeprefix("--").replace("-", "_").upper()
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_:
        cli.settings_from([])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert variable in error and problem in error and repr(value) in error


def test_a_flag_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELDEPLOY_METRICS_INTERVAL", "0")  # would be refused
    monkeypatch.setenv("MODELDEPLOY_NAMESPACES", "a, b")
    chosen = cli.settings_from(["--metrics-interval", "12.5"])
    assert chosen.metrics_interval == 12.5
    assert chosen.namespaces == ("a", "b")
    monkeypatch.delenv("MODELDEPLOY_METRICS_INTERVAL")
    assert cli.settings_from(["--namespace", "x", "--namespace", "y"]).namespaces == ("x", "y")


def test_the_runtime_image_defaults_to_the_operators_own_release() -> None:
    version = importlib.metadata.version("modeldeploy")
    assert settings.OperatorSettings().runtime_image.endswith(f"modeldeploy-runtime:{version}")


def test_unknown_commands_show_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main.main(["cluster", "up"]) == 2
    assert "usage: modeldeploy {run,serve}" in capsys.readouterr().err
