"""Settings: queue specs, and the precedence of file, environment and flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from obanpro.config import ConfigError, load, parse_queues


def test_queue_string_parses() -> None:
    assert parse_queues("default:20, mailers:5") == {
        "default": {"limit": 20, "paused": False},
        "mailers": {"limit": 5, "paused": False},
    }


def test_queue_mapping_parses() -> None:
    queues = parse_queues({"default": 10, "slow": {"limit": 2, "paused": True, "global_limit": 4}})

    assert queues["default"] == {"limit": 10, "paused": False}
    assert queues["slow"] == {"limit": 2, "paused": True, "global_limit": 4}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("default:abc", "invalid queue spec 'default:abc': the limit must be a positive integer, as in 'default:20'"),
        ("default:0", "invalid queue spec 'default:0': the limit must be a positive integer"),
        ("default:-1", "invalid queue spec 'default:-1': the limit must be a positive integer"),
        (":5", "invalid queue spec ':5': the queue name is missing, as in 'default:20'"),
        ("default", "invalid queue spec 'default': expected name:limit, as in 'default:20'"),
        ("a:1,a:2", "queue 'a' appears twice"),
        (",", "expected name:limit"),
        ("q" * 128 + ":1", "at most 127 characters"),
    ],
)
def test_bad_queue_spec_names_value(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_queues(spec)

    assert message in str(raised.value)


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    (tmp_path / "obanpro.toml").write_text(
        'prefix = "from_file"\nnode = "file-node"\nprocesses = 3\ngrace_period = 4.5\n[queues]\ndefault = 7\n'
    )
    environ = {"OBAN_NODE": "env-node", "OBAN_PRO_PROCESSES": "5", "OBAN_QUEUES": ""}

    config = load(flags={"processes": 2}, environ=environ, cwd=tmp_path)

    assert config.prefix == "from_file"
    assert config.node == "env-node"
    assert config.processes == 2
    assert config.grace_period == 4.5
    assert config.queues == {"default": {"limit": 7, "paused": False}}
    assert config.source == str(tmp_path / "obanpro.toml")


def test_oban_toml_is_read(tmp_path: Path) -> None:
    (tmp_path / "oban.toml").write_text('[queues.mailers]\nlimit = 3\npaused = true\n')

    config = load(environ={}, cwd=tmp_path)

    assert config.queues == {"mailers": {"limit": 3, "paused": True}}


def test_environment_lists_and_numbers(tmp_path: Path) -> None:
    environ = {"OBAN_IMPORTS": "app.a, app.b", "OBAN_GRACE_PERIOD": "2.5", "OBAN_QUEUES": "x:1"}

    config = load(environ=environ, cwd=tmp_path)

    assert config.imports == ["app.a", "app.b"]
    assert config.grace_period == 2.5
    assert config.queues == {"x": {"limit": 1, "paused": False}}


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OBAN_PRO_PROCESSES": "many"}, "invalid OBAN_PRO_PROCESSES='many': expected an integer"),
        ({"OBAN_PRO_PROCESSES": "0"}, "invalid processes 0"),
        ({"OBAN_QUEUES": "default:abc"}, "invalid OBAN_QUEUES: invalid queue spec 'default:abc'"),
        ({"OBAN_PREFIX": "Bad-Name"}, "invalid prefix 'Bad-Name'"),
        ({"OBAN_LOG_LEVEL": "loud"}, "invalid log_level 'loud'"),
        ({"OBAN_POOL_MIN_SIZE": "5", "OBAN_POOL_MAX_SIZE": "2"}, "pool_min_size 5 is above pool_max_size 2"),
    ],
)
def test_bad_environment_names_setting(tmp_path: Path, environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(environ=environ, cwd=tmp_path)

    assert message in str(raised.value)


def test_unknown_file_key_is_named(tmp_path: Path) -> None:
    (tmp_path / "obanpro.toml").write_text("queuez = 1\n")

    with pytest.raises(ConfigError, match="unknown setting 'queuez'"):
        load(environ={}, cwd=tmp_path)


def test_broken_toml_is_reported(tmp_path: Path) -> None:
    (tmp_path / "obanpro.toml").write_text("queues = [\n")

    with pytest.raises(ConfigError, match="invalid TOML in"):
        load(environ={}, cwd=tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("log_level = 5\n", "invalid log_level 5: expected a string"),
        ("node = 5\n", "invalid node 5: expected a string"),
        ("dsn = 5\n", "invalid dsn 5: expected a string"),
        ("setup = 5\n", "invalid setup 5: expected a string"),
        ("imports = 5\n", "invalid imports 5: expected a list of module names"),
        ("pruner = 5\n", "invalid pruner 5: expected a table"),
        ('[queues.default]\nlimit = 5\npaused = "no"\n', "invalid paused 'no' for queue 'default': expected true or false"),
    ],
)
def test_wrong_file_types_are_named(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "obanpro.toml").write_text(text)

    with pytest.raises(ConfigError) as raised:
        load(environ={}, cwd=tmp_path)

    assert message in str(raised.value)


def test_huge_limit_is_rejected() -> None:
    for spec in ("big:50000000", "default:99999999999"):
        with pytest.raises(ConfigError, match="the limit is at most 100,000 jobs at once per node"):
            parse_queues(spec)
