import json

import pytest
from typer.testing import CliRunner

from alnet.cli import app

runner = CliRunner()


def test_synth_writes_a_dataset_that_info_reads(tmp_path):
    result = runner.invoke(app, ["synth", str(tmp_path / "d"), "--n-subjects", "2", "--cells-per-subject", "2",
                                 "--prelim-subjects", "1", "--final-images", "1"])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(app, ["info", str(tmp_path / "d"), "--json"]).stdout)
    assert info["images"] == 2 * 2 * 2 + 2 * 2 + 1 and info["subjects"] == 6


@pytest.mark.slow
def test_train_then_evaluate_the_run_and_one_checkpoint(synthetic_root, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(synthetic_root), "--config", "subject", "--epochs", "1",
                                 "--image-size", "136", "--batch-size", "8", "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "prelim" in result.output and f"run directory: {run}" in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == "subject" and set(metrics["prelim"]["confusion"]) == {"tp", "tn", "fp", "fn"}

    again = runner.invoke(app, ["evaluate", str(run), "--data", str(synthetic_root)])
    assert again.exit_code == 0, again.output
    evaluation = json.loads((run / "evaluation.json").read_text())
    for fold, original in zip(evaluation["folds"], metrics["folds"]):
        assert fold["confusion"] == original["confusion"]

    checkpoint = run / "checkpoints" / "fold_0" / (run / "folds" / "fold_0" / "checkpoint.txt").read_text().strip()
    one = runner.invoke(app, ["evaluate", str(checkpoint), "--data", str(synthetic_root), "--split", "train",
                              "--out", str(tmp_path / "one.json")])
    assert one.exit_code == 0, one.output
    assert "left out" in one.output  # the subjects fold_0's model trained on
    result = json.loads((tmp_path / "one.json").read_text())
    assert result["folds"][0]["images"] == metrics["folds"][0]["images"]  # only fold 0's unseen subjects remain


def test_a_second_train_into_the_same_directory_is_refused(synthetic_root, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: alnet\n")
    result = runner.invoke(app, ["train", "--data", str(synthetic_root), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--resume" in result.output


def test_resume_refuses_settings_it_would_ignore(synthetic_root, tmp_path):
    from alnet.config import RunConfig

    (tmp_path / "run").mkdir()
    RunConfig(epochs=2).to_yaml(tmp_path / "run" / "config.yaml")
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--data", str(synthetic_root),
                                 "--epochs", "5", "--synthetic", str(tmp_path)])
    assert result.exit_code == 2
    assert "--epochs, --synthetic would be ignored" in " ".join(result.output.split())
    # Where and how fast it runs is the caller's: a resume on more cores than the machine has is refused too.
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--data", str(synthetic_root),
                                 "--devices", "99", "--no-progress"])
    assert result.exit_code == 2 and "devices 99 is more than this machine has" in result.output


def test_bad_configuration_and_checkpoint_files_are_one_line_errors(synthetic_root, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    result = runner.invoke(app, ["train", "--data", str(synthetic_root), "--config", str(bad)])
    assert result.exit_code == 2 and "unknown setting(s) epochz" in result.output
    fake = tmp_path / "model.ckpt"
    fake.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["evaluate", str(fake), "--data", str(synthetic_root)])
    assert result.exit_code == 2 and "not an alnet checkpoint" in result.output


def _printed_table(monkeypatch, terminal: bool, width: int) -> str:
    import io

    from rich.console import Console

    from alnet.cli import common

    buffer = io.StringIO()
    monkeypatch.setattr(common, "out", Console(file=buffer, width=width, force_terminal=terminal,
                                               color_system=None))
    common.print_table("model comparison", ["model", "params", "acc", "AUC"],
                       [["alnet", "535,010", "0.912", "0.974"], ["resnet50+something-long", "4,098", "0.871", "–"]])
    return buffer.getvalue()


def test_a_table_printed_to_a_pipe_keeps_every_number_and_name_whole(monkeypatch):
    text = _printed_table(monkeypatch, terminal=False, width=20)
    for value in ("535,010", "0.912", "0.974", "resnet50+something-long", "4,098", "0.871"):
        assert value in text
    assert "…" not in text


def test_a_table_too_wide_for_the_terminal_turns_vertical_instead_of_cutting(monkeypatch):
    text = _printed_table(monkeypatch, terminal=True, width=30)
    assert "model: alnet, params: 535,010, acc: 0.912, AUC: 0.974" in text.replace("\n", " ").replace("  ", " ")
    assert "…" not in text


@pytest.mark.parametrize("line, message", [
    ("batch_size: 2.5", "batch_size must be a whole number, not 2.5"),
    ('deterministic: "false"', "deterministic must be true or false, not 'false'"),
    ("epochs: one", "epochs must be a whole number, not 'one'"),
    ('augment: "no"', "augment must be true or false, not 'no'"),
    ("devices: 0", "devices must be at least 1"),
    ("image_size: -5", "image_size must be at least 32"),
    ("lr: fast", "lr must be a finite number, not 'fast'"),
    ("lr: .inf", "lr must be a finite number, not inf"),
    ("accelerator: tpu", "accelerator must be one of auto, cpu, gpu, cuda"),
])
def test_a_configuration_value_of_the_wrong_type_or_range_names_the_setting(tmp_path, line, message):
    from alnet.config import ConfigError, RunConfig

    path = tmp_path / "run.yaml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError) as err:
        RunConfig.from_yaml(path)
    assert str(err.value) == f"{path}: {message}" or str(err.value).startswith(f"{path}: {message}")


def test_numbers_yaml_reads_as_text_are_accepted_where_a_number_is_meant(tmp_path):
    from alnet.config import RunConfig

    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\neps: 1e-7\nprecision: 32\n")  # YAML 1.1 reads 1e-4 as a string, 32 as a number
    config = RunConfig.from_yaml(path)
    assert (config.lr, config.eps, config.precision) == (1e-4, 1e-7, "32")


def test_serve_refuses_a_port_already_in_use_before_announcing_it(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", str(tmp_path / "any.ckpt"), "--port", str(port)])
    assert result.exit_code == 2 and f"127.0.0.1:{port} is already in use" in result.output
    assert "serving" not in result.output


def test_demo_never_deletes_a_folder_it_did_not_write(tmp_path):
    precious = tmp_path / "run" / "thesis.tex"
    precious.parent.mkdir()
    precious.write_text("years of work")
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--epochs", "1", "--no-progress"])
    assert result.exit_code == 2 and "is not this demo's earlier run" in result.output
    assert precious.read_text() == "years of work"


def test_predict_refuses_a_batch_size_below_one(tmp_path):
    result = runner.invoke(app, ["predict", str(tmp_path / "m.ckpt"), str(tmp_path), "--batch-size", "0"])
    assert result.exit_code == 2 and "--batch-size" in result.output


def test_synth_never_writes_into_a_folder_that_holds_files(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "UID_1_1_1_all.bmp").write_bytes(b"a real cell")
    result = runner.invoke(app, ["synth", str(tmp_path / "real")])
    assert result.exit_code == 2 and "not an empty folder" in result.output
    assert (tmp_path / "real" / "UID_1_1_1_all.bmp").read_bytes() == b"a real cell"


def test_demo_replaces_only_its_own_earlier_run(tmp_path):
    """A run folder of another dataset (it holds a config.yaml too) is not the demo's to delete."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: alnet\n")
    (run / "data.json").write_text(json.dumps({"root": str(tmp_path / "elsewhere")}))
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--epochs", "1", "--no-progress"])
    assert result.exit_code == 2 and "is not this demo's earlier run" in result.output
    assert (run / "config.yaml").is_file() and not (tmp_path / "synthetic-data").exists()


def test_evaluate_checks_its_output_before_evaluating(tmp_path):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"the model")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    for out, message in ((checkpoint, "is one of the inputs"), (notes, "--force"), (tmp_path, "is a folder"),
                         (tmp_path / "nowhere" / "m.json", "no such folder")):
        result = runner.invoke(app, ["evaluate", str(checkpoint), "--data", str(tmp_path), "--out", str(out)])
        assert result.exit_code == 2 and message in result.output, result.output
    assert checkpoint.read_bytes() == b"the model" and notes.read_text() == '{"mine": true}'


def test_a_yaml_bomb_is_refused_without_expanding_it(tmp_path):
    """Nested aliases (\"billion laughs\") under a known setting: ten million leaves if anything expanded them."""
    from alnet.config import ConfigError, RunConfig

    levels = ["&a0 [" + ", ".join(["x"] * 10) + "]"]
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("model: [" + ", ".join(levels) + "]\n")
    with pytest.raises(ConfigError, match="model must be text") as err:
        RunConfig.from_yaml(bomb)
    assert len(str(err.value)) < 500


def test_synth_refuses_a_dataset_larger_than_the_free_space_before_writing_anything(tmp_path):
    out = tmp_path / "synthetic"
    result = CliRunner().invoke(app, ["synth", str(out), "--n-subjects", "10000", "--cells-per-subject", "1000"])
    assert result.exit_code == 2 and "GiB free" in result.output and not out.exists()
    result = CliRunner().invoke(app, ["synth", str(out), "--n-subjects", "100000000"])
    assert result.exit_code == 2 and not out.exists()


def test_compare_and_tune_never_replace_files_of_their_names_that_alnet_did_not_write(mini_root, tmp_path):
    from alnet.train.rundir import BEST_YAML_HEADER, foreign_files

    for command, name in (("compare", "report.html"), ("tune", "best.yaml")):
        out = tmp_path / command
        out.mkdir()
        (out / name).write_text("my own notes\n")
        result = runner.invoke(app, [command, "--data", str(mini_root), "--out", str(out), "--no-progress"])
        assert result.exit_code == 2 and f"{name}: not written by alnet {command}" in result.output, result.output
        assert (out / name).read_text() == "my own notes\n"
    (tmp_path / "tune" / "best.yaml").write_text(BEST_YAML_HEADER + "\nmodel: alnet\n")  # its own: kept for reruns
    assert foreign_files(tmp_path / "tune") == []
