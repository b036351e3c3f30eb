import csv
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from alnet.cli import app
from alnet.config import ConfigError, RunConfig
from alnet.data.cache import prepare
from alnet.data.cnmc import scan
from alnet.data.transforms import Preprocessing
from alnet.train import study as study_module
from alnet.train import tune as tune_module
from alnet.train.loggers import read_history
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
    with open(tmp_path / "t" / "trials.csv", newline="") as handle:
        trials = list(csv.DictReader(handle))
    for trial in trials:  # every trial keeps a CSV log whose last epoch is the score it was ranked by
        logged = read_history(tmp_path / "t" / "logs" / f"trial-{trial['trial']}")
        assert len(logged) == 1
        assert float(logged[-1]["val_accuracy"]) == pytest.approx(float(trial["validation_accuracy"]))


def test_a_grid_with_unknown_settings_is_refused(tmp_path):
    bad = tmp_path / "grid.yaml"
    bad.write_text("search:\n  learning_rate: [0.1]\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        read_grid(bad)


def _fake_training(calls: list, seconds: float = 0.0):
    """A stand-in for training: a score that depends on the point only, and a record of what ran."""
    guard = threading.Lock()

    def train_and_score(config, *args, **kwargs):
        with guard:
            calls.append((config.lr, config.optimizer))
        time.sleep(seconds)
        return {"rmsprop": 0.5, "adam": 0.6}[config.optimizer] + config.lr

    return train_and_score


def _complete_points(storage):
    import optuna

    study = optuna.load_study(study_name=tune_module.STUDY_NAME, storage=storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    return [(t.params["lr"], t.params["optimizer"]) for t in complete], study


def _journal(path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def test_workers_sharing_a_journal_run_each_grid_point_once_and_write_the_same_best(grid, prepared, tmp_path,
                                                                                    monkeypatch):
    calls = []
    monkeypatch.setattr(tune_module, "train_and_score", _fake_training(calls, seconds=0.2))
    storage = f"journal:{tmp_path / 'study.journal'}"
    base = RunConfig(image_size=136, seed=0)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda out: tune(grid, prepared, tmp_path / out, base, storage=storage,
                                                 log=lambda m: None), ["a", "b"]))
    points = {(lr, opt) for lr in (1e-4, 1e-3) for opt in ("rmsprop", "adam")}
    assert sorted(calls) == sorted(points), "every point ran exactly once across both workers"
    done, _ = _complete_points(_journal(tmp_path / "study.journal"))
    assert sorted(done) == sorted(points)
    assert results[0][0] == results[1][0] and (results[0][0].lr, results[0][0].optimizer) == (1e-3, "adam")
    for name in ("best.yaml", "trials.csv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    with open(tmp_path / "a" / "trials.csv", newline="") as handle:
        assert [r["state"] for r in csv.DictReader(handle)] == ["COMPLETE"] * 4


def test_a_point_queued_twice_by_racing_workers_runs_once(grid, prepared, tmp_path, monkeypatch):
    import optuna

    storage = _journal(tmp_path / "study.journal")
    study = optuna.create_study(study_name=tune_module.STUDY_NAME, storage=storage, direction="maximize")
    for _ in range(2):  # two workers queued the whole grid at the same moment
        for lr in (1e-4, 1e-3):
            for opt in ("rmsprop", "adam"):
                study.enqueue_trial({"lr": lr, "optimizer": opt})
    calls = []
    monkeypatch.setattr(tune_module, "train_and_score", _fake_training(calls))
    tune(grid, prepared, tmp_path / "out", RunConfig(image_size=136, seed=0),
         storage=f"journal:{tmp_path / 'study.journal'}", log=lambda m: None)
    assert len(calls) == 4 and len(set(calls)) == 4
    with open(tmp_path / "out" / "trials.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4, "skipped duplicates are not results"


def test_a_point_whose_worker_died_runs_again_and_a_live_worker_is_left_alone(grid, prepared, tmp_path,
                                                                             monkeypatch):
    import optuna

    storage = _journal(tmp_path / "study.journal")
    study = optuna.create_study(study_name=tune_module.STUDY_NAME, storage=storage, direction="maximize")
    study.enqueue_trial({"lr": 1e-4, "optimizer": "adam"})
    dead = study.ask()  # a worker took this point, then its machine went down
    dead.suggest_categorical("lr", [1e-4, 1e-3])
    dead.suggest_categorical("optimizer", ["rmsprop", "adam"])
    dead.set_user_attr("heartbeat", time.time() - 2 * study_module.STALE_SECONDS)
    alive = study.ask()
    alive.set_user_attr("heartbeat", time.time())
    assert study_module.fail_stale_trials(study) == [dead.number]
    assert study_module.fail_stale_trials(study) == [], "a worker that still beats keeps its trial"
    study.tell(alive, state=optuna.trial.TrialState.PRUNED)
    calls, messages = [], []
    monkeypatch.setattr(tune_module, "train_and_score", _fake_training(calls))
    tune(grid, prepared, tmp_path / "out", RunConfig(image_size=136, seed=0),
         storage=f"journal:{tmp_path / 'study.journal'}", log=messages.append)
    assert (1e-4, "adam") in calls and len(calls) == 4
    done, _ = _complete_points(storage)
    assert len(done) == 4 and len(set(done)) == 4


def test_a_worker_with_another_grid_or_a_bad_storage_is_refused(grid, prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(tune_module, "train_and_score", _fake_training([]))
    storage = f"journal:{tmp_path / 'study.journal'}"
    tune(grid, prepared, tmp_path / "a", RunConfig(image_size=136, seed=0), storage=storage, log=lambda m: None)
    with pytest.raises(ConfigError, match="started with another base"):
        tune(grid, prepared, tmp_path / "b", RunConfig(image_size=136, seed=1), storage=storage, log=lambda m: None)
    with pytest.raises(ConfigError, match="does not exist"):
        tune(grid, prepared, tmp_path / "c", RunConfig(image_size=136), storage=f"journal:{tmp_path}/no/such.log")
    with pytest.raises(ConfigError, match="not a storage URL"):
        tune(grid, prepared, tmp_path / "c", RunConfig(image_size=136), storage="localhost:5432")
    with pytest.raises(ConfigError, match=r"cannot open the study.*"):
        tune(grid, prepared, tmp_path / "c", RunConfig(image_size=136), storage="nosuchdialect://x/y")
    assert study_module.shown("postgresql://alice:secret@db/alnet") == "postgresql://alice:***@db/alnet"


@pytest.mark.slow
def test_two_tune_processes_on_one_journal_file_share_the_grid(grid, synthetic_root, tmp_path):
    journal = tmp_path / "study.journal"

    def worker(name):
        command = [sys.executable, "-c", "from alnet.cli import app; app()", "tune", "--data", str(synthetic_root),
                   "--grid", str(grid), "--image-size", "136", "--out", str(tmp_path / name), "--cache",
                   str(tmp_path / f"cache-{name}"), "--storage", f"journal:{journal}"]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    workers = [worker("a"), worker("b")]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    done, study = _complete_points(_journal(journal))
    assert len(done) == 4 and len(set(done)) == 4, "each point finished once"
    ran = [t for t in study.trials if "skipped" not in t.user_attrs]
    assert len(ran) == 4, "no point ran twice"
    for name in ("best.yaml", "trials.csv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server: $ALNET_TEST_POSTGRES, else a throwaway one started from the installed binaries."""
    if os.environ.get("ALNET_TEST_POSTGRES"):
        yield os.environ["ALNET_TEST_POSTGRES"]
        return
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'alnet[postgres]'")
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    if not found[-1]:
        pytest.skip("no PostgreSQL server installed (apt-get install postgresql; .ci/run installs it)")
    bindir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="alnet-pg-"))
    as_owner = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the packaged `postgres` user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` user to run the server as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    steps = [[str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
             [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
              f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"]]
    try:
        for step in steps:
            done = subprocess.run(as_owner + step, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                pytest.skip(f"could not start PostgreSQL: {(done.stderr or done.stdout).strip()[-300:]}")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_owner + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_workers_sharing_a_postgresql_study_run_each_grid_point_once(grid, prepared, tmp_path, monkeypatch,
                                                                    postgres_url):
    calls = []
    monkeypatch.setattr(tune_module, "train_and_score", _fake_training(calls, seconds=0.2))
    base = RunConfig(image_size=136, seed=0)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda out: tune(grid, prepared, tmp_path / out, base, storage=postgres_url,
                                                 log=lambda m: None), ["a", "b"]))
    assert len(calls) == 4 and len(set(calls)) == 4
    done, _ = _complete_points(postgres_url)
    assert len(done) == 4 and len(set(done)) == 4
    assert results[0][0] == results[1][0]
    assert (tmp_path / "a" / "best.yaml").read_text() == (tmp_path / "b" / "best.yaml").read_text()


def test_a_bad_storage_is_refused_before_any_image_is_decoded(grid, synthetic_root, tmp_path):
    result = CliRunner().invoke(app, ["tune", "--data", str(synthetic_root), "--grid", str(grid), "--storage",
                                      "db.example.org:5432", "--cache", str(tmp_path / "cache"), "--out",
                                      str(tmp_path / "t")])
    assert result.exit_code == 2 and "not a storage URL" in result.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "t").exists()
