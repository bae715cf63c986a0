"""The engine config file (engine.config): what it gives s3fs, and the mistakes it refuses.

A config grainflow cannot read as written must stop the command with one line naming the
file and the fix: dropped silently, S3 would be reached with botocore's defaults (another
endpoint, or anonymous access the user turned off).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from engine.config import ConfigError, s3_storage_options


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """Write TOML text to a config file that $GRAINFLOW_CONFIG names; returns its path."""
    path = tmp_path / "grainflow.toml"

    def write(text: str):
        path.write_text(text)
        monkeypatch.setenv("GRAINFLOW_CONFIG", str(path))
        return path

    return write


class TestS3Options:
    def test_every_key_reaches_s3fs(self, config_file):
        config_file('[s3]\nendpoint_url = "http://127.0.0.1:9"\nregion = "eu-west-1"\nprofile = "lab"\n'
                    'anon = false\n')
        assert s3_storage_options() == {"endpoint_url": "http://127.0.0.1:9", "profile": "lab", "anon": False,
                                        "client_kwargs": {"region_name": "eu-west-1"}}

    def test_no_config_file_is_no_options(self, tmp_path, monkeypatch):
        monkeypatch.delenv("GRAINFLOW_CONFIG", raising=False)
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # no grainflow/config.toml there
        assert s3_storage_options() == {}

    def test_a_named_file_that_is_missing_is_refused(self, tmp_path, monkeypatch):
        missing = tmp_path / "no-such-config.toml"
        monkeypatch.setenv("GRAINFLOW_CONFIG", str(missing))
        with pytest.raises(ConfigError, match=re.escape(f"$GRAINFLOW_CONFIG names {missing}, which does not exist")):
            s3_storage_options()

    def test_an_unknown_key_is_refused_with_the_valid_ones(self, config_file):
        path = config_file('[s3]\nendpoint = "http://127.0.0.1:9000"\n')
        with pytest.raises(ConfigError) as info:
            s3_storage_options()
        assert str(info.value) == (f"{path}: unknown [s3] key(s) 'endpoint'; valid keys: "
                                   "endpoint_url, region, profile, anon")

    def test_an_unknown_table_is_refused(self, config_file):
        config_file('[S3]\nendpoint_url = "http://127.0.0.1:9000"\n')
        with pytest.raises(ConfigError, match=r"unknown table\(s\) 'S3'; grainflow reads \[s3\]"):
            s3_storage_options()

    def test_s3_that_is_no_table_is_refused(self, config_file):
        config_file('s3 = "http://127.0.0.1:9000"\n')
        with pytest.raises(ConfigError, match=re.escape("s3 must be a table ([s3] with keys endpoint_url, region")):
            s3_storage_options()

    @pytest.mark.parametrize("text, words", [
        ('anon = "false"', "anon must be a TOML boolean (true or false, no quotes), not 'false'"),
        ("anon = 0", "anon must be a TOML boolean (true or false, no quotes), not 0"),
        ("region = 1", "region must be a TOML string, not 1"),
    ])
    def test_a_value_of_the_wrong_type_is_refused(self, config_file, text, words):
        """A quoted "false" used to turn anonymous access on (bool("false") is True)."""
        config_file(f"[s3]\n{text}\n")
        with pytest.raises(ConfigError, match=re.escape(words)):
            s3_storage_options()


def _grainflow(*args: str, config: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRAINFLOW_CONFIG": config}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


class TestCommandLine:
    """The CLI reads the config when it opens an s3:// URI: one line, exit status 2."""

    def test_a_missing_config_file_is_one_line(self, tmp_path):
        missing = tmp_path / "no-such-config.toml"
        result = _grainflow("catalog", "s3://lab-data/archive", config=str(missing))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert f"$GRAINFLOW_CONFIG names {missing}, which does not exist" in result.stderr

    def test_a_mistyped_key_is_one_line(self, tmp_path):
        config = tmp_path / "config.toml"
        config.write_text('[s3]\nendpoint = "http://127.0.0.1:9000"\n')
        result = _grainflow("catalog", "s3://lab-data/archive", config=str(config))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert "unknown [s3] key(s) 'endpoint'; valid keys: endpoint_url" in result.stderr
