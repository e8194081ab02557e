"""The data root: configured, missing, or the Hub."""

from __future__ import annotations

import pytest

from avss_lib.core.data_root import ENV_VAR, data_file, resolve_data_root
from avss_lib.core.errors import DataError


def test_argument_wins_and_hub_means_none(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "/nonexistent")
    assert resolve_data_root(tmp_path) == tmp_path.resolve()
    assert resolve_data_root("hub") is None


def test_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert resolve_data_root() == tmp_path.resolve()


def test_missing_root_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(DataError, match="no data root configured") as exc:
        resolve_data_root()
    assert "\n" not in str(exc.value) and ENV_VAR in str(exc.value)
    with pytest.raises(DataError, match="does not exist.*hub"):
        resolve_data_root(tmp_path / "nope")


def test_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match="wikitext2/test.txt is missing"):
        data_file(tmp_path, "wikitext2/test.txt")
