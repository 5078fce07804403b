"""One data set, one spec: ``init`` writes ``device: cpu`` on every machine, and each worker of a
search may run on its own device (``search --device``) without changing the study."""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
import pytest
import yaml

from jdsearch.cli import main
from jdsearch.search.queries import open_study


@pytest.mark.slow
def test_search_device_overrides_the_spec_for_this_worker_only(
    search_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, capsys
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = search_assets.study("dev", url, n_trials=2)
    data["device"] = "cuda:7"  # no such device here: the worker's --device decides
    spec_file = tmp_path / "dev.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    search_assets.install_pool(tmp_path, "dev")
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(spec_file), "--device", "gpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "jdsearch: error: --device 'gpu': expected cpu, cuda or cuda:N"
    assert main(["search", str(spec_file), "--device", "cpu", "--quiet"]) == 0
    handle = open_study(url)
    assert handle.spec.device == "cuda:7"  # the study keeps the spec as the user gave it
    assert {t.state for t in handle.study.get_trials()} == {optuna.trial.TrialState.COMPLETE}
    with caplog.at_level(logging.WARNING):  # a second worker on its own device: no spec change
        assert (
            main(["search", str(spec_file), "--device", "cpu", "--n-trials", "1", "--quiet"]) == 0
        )
    assert "different spec" not in caplog.text
    assert len(open_study(url).study.get_trials()) == 3
