"""The zmq-cluster command line: entry points, keygen, --config, exit
statuses and one-line errors; the option helpers later subcommands use."""

import argparse
import os
import subprocess
import sys

import pytest

from zmq_cluster.cli.common import (
    SchedulerLocation, UsageError, add_client_key_options, add_locate_options,
    add_server_key_options, client_security_from, common_options, locate_scheduler,
    server_security_from, settings,
)
from zmq_cluster.cli.main import build_parser, main
from zmq_cluster.config import CONFIG_ENV, Config, read_config, write_scheduler_file
from zmq_cluster.security import (
    ClientSecurity, KeyFileError, KeyPaths, ServerSecurity, keygen, load_public_key,
)

SCRIPT = os.path.join(os.path.dirname(sys.executable), "zmq-cluster")


def run_cli(*args, env=None, module=False):
    """Run the real entry point in a subprocess (bounded)."""
    command = [sys.executable, "-m", "zmq_cluster"] if module else [SCRIPT]
    full_env = dict(os.environ)
    full_env.pop(CONFIG_ENV, None)
    full_env.update(env or {})
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=60,
                          env=full_env)


@pytest.fixture(autouse=True)
def no_config_from_environment(monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)


def assert_one_line_error(stderr, *fragments):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "error:" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ----------------------------------------------------------- entry points


def test_console_script_and_python_m(tmp_path):
    assert os.path.exists(SCRIPT), "the zmq-cluster console script is not installed"
    result = run_cli("--help")
    assert result.returncode == 0 and "keygen" in result.stdout
    result = run_cli("keygen", str(tmp_path / "keys"), module=True)
    assert result.returncode == 0, result.stderr
    assert KeyPaths(tmp_path / "keys").client_secret.exists()
    result = run_cli("keygen", str(tmp_path / "keys"))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "zmq-cluster keygen: error: keys exist already",
                          "--force")
    version = run_cli("--version", module=True)
    assert version.returncode == 0 and version.stdout.startswith("zmq-cluster ")


def test_every_flag_has_help(capsys):
    assert main(["keygen", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--config FILE", "--force", "DIR"):
        assert flag in out
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in subparsers.choices.items():
        for action in subparser._actions:
            assert action.help, "%s %s has no help" % (name, action.option_strings or action.dest)


def test_usage_errors_exit_2_in_one_line(capsys):
    assert main([]) == 2
    assert_one_line_error(capsys.readouterr().err, "a subcommand is needed")
    assert main(["nonsense"]) == 2
    assert_one_line_error(capsys.readouterr().err, "invalid choice")
    assert main(["keygen", "--bogus", "x"]) == 2
    assert_one_line_error(capsys.readouterr().err, "unrecognized arguments: --bogus")
    assert main(["keygen"]) == 2
    assert_one_line_error(capsys.readouterr().err, "zmq-cluster keygen DIR")


# ------------------------------------------------------------------ keygen


def test_keygen_writes_and_reports(tmp_path, capsys):
    assert main(["keygen", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    paths = KeyPaths(tmp_path / "k")
    for path in paths.files():
        assert path.exists() and str(path) in out
    assert "--keys %s" % paths.directory in out


def test_keygen_force_replaces(tmp_path, capsys):
    paths = keygen(tmp_path / "k")
    old = load_public_key(paths.client_public)
    assert main(["keygen", str(paths.directory)]) == 1
    assert load_public_key(paths.client_public) == old
    assert main(["keygen", "--force", str(paths.directory)]) == 0
    assert load_public_key(paths.client_public) != old


def test_keygen_where_it_cannot_write_says_so_in_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["keygen", str(tmp_path / "afile")]) == 1
    assert_one_line_error(capsys.readouterr().err, "zmq-cluster keygen: error: cannot write keys"
                          " in %s: %s is not a directory" % (tmp_path / "afile",
                                                            tmp_path / "afile"))
    assert main(["keygen", str(tmp_path / "afile" / "k")]) == 1
    assert_one_line_error(capsys.readouterr().err, "cannot write keys in %s: Not a directory"
                          % (tmp_path / "afile" / "k"))


def test_keygen_directory_from_the_config(tmp_path, capsys, monkeypatch):
    config = tmp_path / "conf" / "zc.toml"
    config.parent.mkdir()
    config.write_text('keys = "cluster-keys"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["keygen", "--config", str(config)]) == 0
    assert KeyPaths(tmp_path / "conf" / "cluster-keys").scheduler_secret.exists()
    # The command line overrides the file.
    assert main(["keygen", str(tmp_path / "flag-keys"), "--config", str(config)]) == 0
    assert KeyPaths(tmp_path / "flag-keys").scheduler_secret.exists()


def test_config_from_the_environment(tmp_path, capsys, monkeypatch):
    config = tmp_path / "zc.toml"
    config.write_text('keys = "env-keys"\n')
    monkeypatch.setenv(CONFIG_ENV, str(config))
    assert main(["keygen"]) == 0
    assert KeyPaths(tmp_path / "env-keys").client_secret.exists()


@pytest.mark.parametrize("text, fragments", [
    ("worker = 2\n", ["unknown key 'worker'"]),
    ("workers = 'two'\n", ["key 'workers'", "must be an integer"]),
    ("workers = \n", ["not valid TOML"]),
])
def test_invalid_config_exits_2_naming_key_and_file(tmp_path, capsys, text, fragments):
    config = tmp_path / "zc.toml"
    config.write_text(text)
    assert main(["keygen", str(tmp_path / "k"), "--config", str(config)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(config), *fragments)
    assert not (tmp_path / "k").exists()


def test_missing_config_exits_2(tmp_path, capsys):
    assert main(["keygen", str(tmp_path / "k"), "--config", str(tmp_path / "no.toml")]) == 2
    assert_one_line_error(capsys.readouterr().err, "config file not found")


def test_unwritable_directory_exits_1(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["keygen", str(blocker / "keys")]) == 1
    assert_one_line_error(capsys.readouterr().err, "zmq-cluster keygen: error:")


# ------------------------------------------- helpers for later subcommands


def parse(builders, argv, config=Config()):
    parser = argparse.ArgumentParser(parents=[common_options()])
    for build in builders:
        build(parser)
    return settings(parser.parse_args(argv), config)


def test_server_key_options(tmp_path):
    paths = keygen(tmp_path / "k")
    values = parse([add_server_key_options], ["--keys", str(paths.directory)])
    assert server_security_from(values) == ServerSecurity.from_directory(paths.directory)
    assert server_security_from(parse([add_server_key_options], [])) is None
    with pytest.raises(KeyFileError):
        server_security_from(parse([add_server_key_options],
                                   ["--secret-key", str(paths.scheduler_public),
                                    "--authorized-keys", str(paths.authorized)]))


def test_client_options_from_a_config_and_a_scheduler_file(tmp_path):
    paths = keygen(tmp_path / "k")
    config_path = tmp_path / "zc.toml"
    config_path.write_text('scheduler_file = "s.json"\nsecret_key = "k/client.key_secret"\n')
    config = read_config(config_path)
    scheduler_key = load_public_key(paths.scheduler_public).decode()
    write_scheduler_file(tmp_path / "s.json", "tcp://10.1.2.3:5555", scheduler_key)
    values = parse([add_locate_options, add_client_key_options], [], config)
    location = locate_scheduler(values)
    assert location == SchedulerLocation("tcp://10.1.2.3:5555", scheduler_key)
    security = client_security_from(values, location)
    assert security == ClientSecurity.from_directory(paths.directory)
    # --connect on the command line wins over... nothing: both is an error.
    with pytest.raises(UsageError, match="not both"):
        locate_scheduler(parse([add_locate_options], ["--connect", "tcp://a:1"], config))


def test_locate_needs_an_address():
    with pytest.raises(UsageError, match="--connect ADDRESS or --scheduler-file"):
        locate_scheduler(parse([add_locate_options], []))
    assert locate_scheduler(parse([add_locate_options], ["--connect", "tcp://a:1"])) == \
        SchedulerLocation("tcp://a:1")


def test_a_curve_scheduler_needs_client_keys(tmp_path):
    location = SchedulerLocation("tcp://a:1", load_public_key(
        keygen(tmp_path / "k").scheduler_public).decode())
    with pytest.raises(UsageError, match="uses CURVE.*--keys DIR"):
        client_security_from(parse([add_client_key_options], []), location)
    assert client_security_from(parse([add_client_key_options], []),
                                SchedulerLocation("tcp://a:1")) is None


def test_status_shows_mean_task_times_in_a_unit_that_suits_them():
    from zmq_cluster.cli.status import _task_time
    # Before: "0.000121 s" beside "9.24e-05 s" in one column.
    assert [_task_time(s) for s in (0.000121, 9.24e-05, 0.0125, 3.25, 125.0)] == [
        "121 us", "92.4 us", "12.5 ms", "3.25 s", "125 s"]
