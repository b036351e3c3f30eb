import csv

import pytest
import yaml
from typer.testing import CliRunner

from alnet.cli import app
from alnet.config import ConfigError, RunConfig
from alnet.data.cache import prepare
from alnet.data.cnmc import scan
from alnet.data.transforms import Preprocessing
from alnet.train import tune as tune_module
from alnet.train.tune import read_grid, tune, validation_split


@pytest.fixture
def grid(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"search": {"lr": [1.0e-4, 1.0e-3], "optimizer": ["rmsprop", "adam"]},
                                    "fixed": {"epochs": 1, "batch_size": 8, "augment": False}}))
    return path


@pytest.fixture(scope="module")
def prepared(synthetic_root, tmp_path_factory):
    return prepare(scan(synthetic_root).cells, tmp_path_factory.mktemp("cache"), Preprocessing(size=136))


def test_trials_are_scored_on_validation_subjects_from_the_training_folds_only(prepared):
    split = validation_split(prepared, 0.15, seed=0)
    cells = prepared.cells
    assert {cells[i].split for i in list(split.train) + list(split.val)} == {"train"}
    assert not {cells[i].subject for i in split.train} & {cells[i].subject for i in split.val}
    assert len(split.test) == 0


@pytest.mark.slow
def test_a_killed_search_resumes_and_never_reruns_finished_trials(grid, prepared, tmp_path, monkeypatch):
    calls = []
    real = tune_module.train_and_score

    def crash_on_third(config, *args, **kwargs):
        calls.append((config.lr, config.optimizer))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the search is killed during its third trial
        return real(config, *args, **kwargs)

    monkeypatch.setattr(tune_module, "train_and_score", crash_on_third)
    base = RunConfig(image_size=136, seed=0)
    with pytest.raises(KeyboardInterrupt):
        tune(grid, prepared, tmp_path / "study", base, log=lambda m: None)
    first_two = calls[:2]
    calls.clear()
    messages = []
    best, score, complete = tune(grid, prepared, tmp_path / "study", base, log=messages.append)
    assert any("2 trial(s) finished earlier are kept" in m for m in messages)
    assert len(calls) == 2 and not set(calls) & set(first_two), "only the two unfinished grid points run"
    assert len(complete) == 4
    assert {(t.params["lr"], t.params["optimizer"]) for t in complete} == {
        (lr, opt) for lr in (1e-4, 1e-3) for opt in ("rmsprop", "adam")}
    assert score == max(t.value for t in complete)
    loaded = RunConfig.from_yaml(tmp_path / "study" / "best.yaml")  # what `alnet train --config` reads
    assert (loaded.lr, loaded.optimizer) == (best.lr, best.optimizer) and loaded.epochs == 1
    with open(tmp_path / "study" / "trials.csv", newline="") as handle:
        assert sum(r["state"] == "COMPLETE" for r in csv.DictReader(handle)) == 4


@pytest.mark.slow
def test_tune_command_prints_the_table_and_the_best_configuration(grid, synthetic_root, tmp_path, monkeypatch):
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    result = CliRunner().invoke(app, ["tune", "--data", str(synthetic_root), "--grid", str(grid), "--image-size",
                                      "136", "--out", str(tmp_path / "t"), "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "trial 4/4" in result.output and "best validation accuracy" in result.output
    assert (tmp_path / "t" / "best.yaml").is_file()
    assert list(workdir.iterdir()) == [], "trials write nothing into the working directory"


def test_a_grid_with_unknown_settings_is_refused(tmp_path):
    bad = tmp_path / "grid.yaml"
    bad.write_text("search:\n  learning_rate: [0.1]\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        read_grid(bad)
