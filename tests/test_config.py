"""The TOML config file, the merge of flags over file over defaults, and
the scheduler file."""

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import zmq

from zmq_cluster.config import (
    CONFIG_ENV, KEYS, Config, ConfigError, SchedulerFile, SchedulerFileError, check_endpoint,
    find_config,
    load_config, merge, read_config, read_scheduler_file, write_scheduler_file,
)

FULL = """
listen = "tcp://0.0.0.0:5555"
connect = "tcp://head:5555"
scheduler_file = "run/scheduler.json"
workers = 8
imports = ["numpy", "mylab.tasks"]
heartbeat_timeout = 10
insecure = false
malloc_tuning = true
shared_memory = true
secret_key = "keys/client.key_secret"
scheduler_key = "/etc/zc/scheduler.key"
authorized_keys = "~/authorized"
keys = "keys"
"""


def write(path, text):
    path.write_text(text)
    return path


def test_every_key_read_with_types_and_paths_resolved_against_the_file(tmp_path):
    config = load_config(write(tmp_path / "zc.toml", FULL))
    assert set(config.values) == set(KEYS)
    assert config.path == tmp_path / "zc.toml"
    assert config.get("listen") == "tcp://0.0.0.0:5555"
    assert config.get("workers") == 8
    assert config.get("imports") == ("numpy", "mylab.tasks")
    assert config.get("heartbeat_timeout") == 10.0
    assert isinstance(config.get("heartbeat_timeout"), float)
    assert config.get("insecure") is False
    assert config.get("malloc_tuning") is True
    assert config.get("shared_memory") is True
    assert config.get("scheduler_file") == tmp_path / "run" / "scheduler.json"
    assert config.get("secret_key") == tmp_path / "keys" / "client.key_secret"
    assert config.get("keys") == tmp_path / "keys"
    assert config.get("scheduler_key") == Path("/etc/zc/scheduler.key")
    assert config.get("authorized_keys") == Path.home() / "authorized"


def test_relative_paths_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    write(tmp_path / "zc.toml", 'keys = "keys"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config("zc.toml").get("keys") == tmp_path / "keys"


def test_empty_config():
    assert Config().values == {} and Config().get("workers", 3) == 3
    with pytest.raises(KeyError):
        Config().get("nonsense")


@pytest.mark.parametrize("line, key", [
    ("listen = 5555", "listen"),
    ("listen = ''", "listen"),
    ("connect = ['tcp://a:1']", "connect"),
    ("connect = 'head:5555'", "connect"),
    ("connect = 'tcp://head'", "connect"),
    ("connect = 'tcp://head:0'", "connect"),
    ("connect = 'tcp://head:70000'", "connect"),
    ("connect = 'inproc://x'", "connect"),
    ("listen = 'tcp://*:abc'", "listen"),
    ("listen = 'udp://*:5555'", "listen"),
    ("scheduler_file = 1", "scheduler_file"),
    ("workers = 0", "workers"),
    ("workers = true", "workers"),
    ("workers = 2.5", "workers"),
    ("workers = '4'", "workers"),
    ("imports = 'numpy'", "imports"),
    ("imports = ['numpy', 3]", "imports"),
    ("imports = ['']", "imports"),
    ("heartbeat_timeout = 0", "heartbeat_timeout"),
    ("heartbeat_timeout = -1.5", "heartbeat_timeout"),
    ("heartbeat_timeout = nan", "heartbeat_timeout"),
    ("heartbeat_timeout = inf", "heartbeat_timeout"),
    ("heartbeat_timeout = true", "heartbeat_timeout"),
    ("insecure = 'yes'", "insecure"),
    ("insecure = 1", "insecure"),
    ("malloc_tuning = 'on'", "malloc_tuning"),
    ("malloc_tuning = 1", "malloc_tuning"),
    ("secret_key = true", "secret_key"),
    ("keys = {}", "keys"),
])
def test_wrong_types_and_values_name_the_key_and_the_file(tmp_path, line, key):
    path = write(tmp_path / "bad.toml", line + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert repr(key) in message and str(path) in message and "must be" in message


@pytest.mark.parametrize("address", [
    "tcp://head:5555", "tcp://10.0.0.1:1", "tcp://[::1]:65535", "tcp://eth0;head:5555",
    "ipc:///tmp/x/scheduler", "ipc://@abstract",
])
def test_addresses_to_connect_to(address):
    assert check_endpoint(address) == address


@pytest.mark.parametrize("address", ["tcp://*:0", "tcp://*:*", "tcp://0.0.0.0:5555",
                                     "tcp://eth0:5555", "tcp://127.0.0.1:0"])
def test_addresses_to_listen_on(address):
    assert check_endpoint(address, listen=True) == address
    if address.endswith((":0", ":*")):
        with pytest.raises(ValueError, match="PORT of 1-65535"):
            check_endpoint(address)


@pytest.mark.parametrize("address, message", [
    ("foo", "an address such as tcp://HOST:PORT or ipc://PATH"),
    ("ipc://", "an address such as"),
    ("inproc://x", "an address such as"),
    ("udp://head:5555", "an address such as"),
    ("tcp://head", "with a host and a port"),
    ("tcp://:5555", "with a host and a port"),
    ("tcp://head:", "with a host and a port"),
    ("tcp://head:abc", "PORT of 0-65535 or \\*"),
    ("tcp://head:65536", "PORT of 0-65535 or \\*"),
    ("tcp://head:-1", "PORT of 0-65535 or \\*"),
])
def test_bad_addresses_say_what_an_address_must_be(address, message):
    with pytest.raises(ValueError, match=message):
        check_endpoint(address, listen=True)
    with pytest.raises(ValueError):
        check_endpoint(address)
    with pytest.raises(TypeError):
        check_endpoint(5555)  # type: ignore[arg-type]


@pytest.mark.parametrize("text, key", [
    ("worker = 3\n", "worker"),
    ("heartbeat-timeout = 3\n", "heartbeat-timeout"),
    ("[scheduler]\nlisten = 'tcp://*:1'\n", "scheduler"),
])
def test_unknown_keys_name_the_key_and_the_file(tmp_path, text, key):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match="unknown key %r in config file %s" % (key, path)):
        load_config(path)


def test_not_toml_names_the_file_and_the_place(tmp_path):
    path = write(tmp_path / "bad.toml", "workers = \n")
    with pytest.raises(ConfigError, match="%s is not valid TOML: .*line 1" % path):
        load_config(path)
    path.write_bytes(b"listen = '\xff'\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.toml"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)


def test_find_config_flag_then_environment(tmp_path):
    assert find_config(None, {}) is None
    assert find_config(None, {CONFIG_ENV: ""}) is None
    assert find_config(None, {CONFIG_ENV: "/a.toml"}) == Path("/a.toml")
    assert find_config("/b.toml", {CONFIG_ENV: "/a.toml"}) == Path("/b.toml")


def test_read_config(tmp_path, monkeypatch):
    path = write(tmp_path / "zc.toml", "workers = 3\n")
    assert read_config(None, {}) == Config()
    assert read_config(None, {CONFIG_ENV: str(path)}).get("workers") == 3
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert read_config().get("workers") == 3
    with pytest.raises(ConfigError, match="not found: .*gone.toml.*named by ZMQ_CLUSTER_CONFIG"):
        read_config(None, {CONFIG_ENV: str(tmp_path / "gone.toml")})
    with pytest.raises(ConfigError, match="config file not found: .*gone.toml$"):
        read_config(tmp_path / "gone.toml", {})


def test_merge_flags_over_file_over_defaults(tmp_path):
    config = load_config(write(tmp_path / "zc.toml",
                               'workers = 4\nimports = ["a"]\nconnect = "tcp://f:1"\n'))
    merged = merge({"workers": 1, "heartbeat_timeout": 10.0, "timeout": 5.0}, config,
                   {"workers": 2, "imports": None, "connect": None, "json": None,
                    "insecure": None, "timeout": None})
    assert merged == {"workers": 2, "heartbeat_timeout": 10.0, "timeout": 5.0,
                      "imports": ("a",), "connect": "tcp://f:1", "json": None,
                      "insecure": None}
    # A list flag replaces the file's list.
    assert merge({}, config, {"imports": ["b"]})["imports"] == ["b"]
    # A false flag is a value, not "not given".
    assert merge({"insecure": True}, Config(), {"insecure": False})["insecure"] is False


# ------------------------------------------------------------ scheduler file


def test_scheduler_file_round_trip(tmp_path):
    path = tmp_path / "scheduler.json"
    key = zmq.curve_keypair()[0]
    write_scheduler_file(path, "tcp://10.0.0.1:5555", key)
    assert json.loads(path.read_text()) == {"address": "tcp://10.0.0.1:5555",
                                            "public_key": key.decode()}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert read_scheduler_file(path) == SchedulerFile("tcp://10.0.0.1:5555", key.decode())
    write_scheduler_file(path, "ipc:///tmp/x/s")  # replaces it
    assert json.loads(path.read_text()) == {"address": "ipc:///tmp/x/s", "public_key": None}
    assert read_scheduler_file(path) == SchedulerFile("ipc:///tmp/x/s", None)
    assert os.listdir(tmp_path) == ["scheduler.json"]  # no temporary left behind


def test_write_scheduler_file_checks_its_input(tmp_path):
    with pytest.raises(ValueError, match="not a Z85"):
        write_scheduler_file(tmp_path / "s.json", "tcp://a:1", "short")
    with pytest.raises(ValueError, match="needs an address"):
        write_scheduler_file(tmp_path / "s.json", "")
    with pytest.raises(OSError):
        write_scheduler_file(tmp_path / "missing" / "s.json", "tcp://a:1")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("text, message", [
    ("not json", "is not JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"address": "tcp://a:1", "extra": 1}', "unknown keys: extra"),
    ('{"public_key": null}', '"address" must be an address such as'),
    ('{"address": "head:5555"}', '"address" must be an address such as'),
    ('{"address": "tcp://head:99999"}', '"address" must be tcp://HOST:PORT with a PORT of 1-'),
    ('{"address": "tcp://a:1", "public_key": "abc"}', '"public_key" must be a 40-character'),
    ('{"address": "tcp://a:1", "public_key": 7}', '"public_key" must be a 40-character'),
])
def test_malformed_scheduler_files_are_named(tmp_path, text, message):
    path = write(tmp_path / "s.json", text)
    with pytest.raises(SchedulerFileError, match=message) as info:
        read_scheduler_file(path)
    assert str(path) in str(info.value)


def test_missing_scheduler_file(tmp_path):
    with pytest.raises(SchedulerFileError, match="not found: .*s.json \\(is the scheduler"):
        read_scheduler_file(tmp_path / "s.json")
    start = time.monotonic()
    with pytest.raises(SchedulerFileError, match="after waiting 0.3s"):
        read_scheduler_file(tmp_path / "s.json", timeout=0.3, poll_interval=0.05)
    assert time.monotonic() - start >= 0.3


def test_read_scheduler_file_waits_for_a_late_scheduler(tmp_path):
    path = tmp_path / "s.json"
    writer = threading.Timer(0.2, write_scheduler_file, (path, "tcp://a:1"))
    writer.start()
    try:
        assert read_scheduler_file(path, timeout=10, poll_interval=0.02).address == "tcp://a:1"
    finally:
        writer.join()
