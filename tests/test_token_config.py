"""The token-file and token-endpoint options: parsed and checked before anything starts."""

from __future__ import annotations

import pytest

from jwt_proxy.config import Config
from jwt_proxy.config import ConfigError
from jwt_proxy.config import TokenFile


def test_token_file_is_split_at_the_first_equals_sign(tmp_path):
    config = Config.from_options(token_file=[f"{tmp_path}/t=api://x?a=b", f"{tmp_path}/u=aud"])
    assert config.token_files == (TokenFile(f"{tmp_path}/t", "api://x?a=b"), TokenFile(f"{tmp_path}/u", "aud"))
    assert config.serves_sdk_tokens


def test_a_relative_path_is_made_absolute_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Config.from_options(token_file=["token=aud"]).token_files == (TokenFile(f"{tmp_path}/token", "aud"),)


def test_nothing_configured_serves_no_sdk_tokens():
    config = Config.from_options()
    assert (config.token_files, config.token_listen, config.token_endpoint_audiences) == ((), None, ())
    assert config.token_file_mode == 0o600
    assert not config.serves_sdk_tokens


@pytest.mark.parametrize(
    ("item", "allowed"),
    [
        ("no-equals-sign", "use PATH=AUDIENCE"),
        ("=aud", "use PATH=AUDIENCE"),
        ("{tmp}/t=", "audiences must be non-empty"),
        ("{tmp}/t=a b", "audiences must be non-empty, with no spaces"),
        ("{tmp}=aud", "is a directory"),
        ("{tmp}/missing/t=aud", "does not exist"),
    ],
)
def test_bad_token_files(tmp_path, item, allowed):
    with pytest.raises(ConfigError) as raised:
        Config.from_options(token_file=[item.format(tmp=tmp_path)])
    assert raised.value.flag == "--token-file"
    assert allowed in str(raised.value)


def test_the_same_path_twice_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="each path at most once"):
        Config.from_options(token_file=[f"{tmp_path}/t=a", f"{tmp_path}/./t=b"])


@pytest.mark.parametrize(("text", "mode"), [("0600", 0o600), ("600", 0o600), ("0o640", 0o640), ("0644", 0o644), ("0400", 0o400)])
def test_token_file_mode_is_octal(text, mode):
    assert Config.from_options(token_file_mode=text).token_file_mode == mode


@pytest.mark.parametrize("text", ["0800", "rw-------", "", "4755", "01777", "-600", "0x180"])
def test_bad_token_file_modes(text):
    with pytest.raises(ConfigError) as raised:
        Config.from_options(token_file_mode=text)
    assert raised.value.flag == "--token-file-mode"


def test_token_endpoint_audiences_are_required_with_the_listener_and_only_then():
    config = Config.from_options(token_listen_addr="127.0.0.1:9091", token_endpoint_audience=["b,a", "a"])
    assert config.token_endpoint_audiences == ("a", "b")
    assert config.token_listen.port == 9091
    with pytest.raises(ConfigError, match="required with --token-listen-addr"):
        Config.from_options(token_listen_addr="127.0.0.1:9091")
    with pytest.raises(ConfigError, match="only used with --token-listen-addr"):
        Config.from_options(token_endpoint_audience=["a"])
    with pytest.raises(ConfigError, match="non-empty, with no spaces"):
        Config.from_options(token_listen_addr="127.0.0.1:9091", token_endpoint_audience=["a,,b"])


@pytest.mark.parametrize(
    ("token_listen", "other_flag"),
    [
        ("127.0.0.1:8080", "--listen-addr"),
        ("127.0.0.1:9090", "--metrics-listen-addr"),
        (":8080", "--listen-addr"),
        (":9090", "--metrics-listen-addr"),
    ],
)
def test_the_token_listener_differs_from_the_others(token_listen, other_flag):
    with pytest.raises(ConfigError) as raised:
        Config.from_options(token_listen_addr=token_listen, token_endpoint_audience=["a"])
    assert raised.value.flag == "--token-listen-addr"
    assert f"must differ from {other_flag}" in str(raised.value)
