"""``model_export tune``: a tiny real search (seconds) that exports a valid artifact with its results table, the
same results for the same seed, the winner retrained by ``train --config`` to the same model, and one-line errors."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

import contract
from conftest import assert_one_line_error, run_cli
from model_export.config import TrainConfig
from model_export.tune import ETA, milestones, parse_budget, sign_test

DATA = ["data/banking77", "--label-column", "category", "--limit", "800"]
# The default trial (trial 0) is these fixed flags; the space varies the rest.
TINY = ["--embedding-dim", "16", "--hidden-size", "16", "--epochs", "4", "--vocab-size", "400", "--threads", "1",
        "--learning-rate", "0.01"]
SPACE = {"dropout": [0.1, 0.5], "batch_size": [16, 32], "bidirectional": [True, False], "label_smoothing": [0.0, 0.1]}


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli("model_export", *args)


def tune(tmp_path: Path, out: str, *extra: str, seed: int = 0) -> subprocess.CompletedProcess:
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    return cli("tune", *DATA, *TINY, "--budget", "5m", "--trials", "6", "--space", str(space), "--seed", str(seed),
               "--out", str(tmp_path / out / "tiny" / "1"), *extra)


def rows(folder: Path) -> list[dict]:
    with open(folder / "tune_results.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("tune")
    result = tune(tmp_path, "a")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path


@pytest.mark.slow
def test_a_tiny_search_exports_a_valid_artifact_with_its_results(tuned: Path):
    folder = tuned / "a" / "tiny" / "1"
    artifact = contract.check(folder)  # the same contract, parity and invariance checks as train
    manifest = artifact.manifest
    assert manifest.verification["parity_max_abs_diff"] <= 1e-5
    table = rows(folder)
    assert [int(row["trial"]) for row in table] == list(range(6))
    assert table[0]["dropout"] == "0.3" and table[0]["batch_size"] == "32"  # trial 0: the default configuration
    winners = [row for row in table if row["winner"] == "True"]
    assert len(winners) == 1 and winners[0]["status"] == "complete"
    eligible = [row for row in table if row["trial"] == "0" or row["beats_default"] == "True"]
    assert winners[0] in eligible  # the default, or a trial significantly ahead of it on validation
    assert float(winners[0]["val_accuracy"]) == max(float(row["val_accuracy"]) for row in eligible)
    compared = sum(row["status"] == "complete" for row in table[1:])
    for row in table[1:]:
        wins, losses = (int(n) for n in row["vs_default"].lstrip("+").split("/-"))
        assert (row["beats_default"] == "True") == (row["status"] == "complete"
                                                    and sign_test(wins, losses) < 0.05 / compared)
    record = manifest.training["tune"]
    assert record["winner"] == int(winners[0]["trial"]) and record["trials"] == 6
    assert record["space"]["dropout"] == [0.1, 0.5] and "embedding_dim" not in record["space"]  # fixed by a flag
    chosen = json.loads((folder / "tune_config.json").read_text())
    assert chosen == manifest.training["config"]
    assert chosen["embedding_dim"] == 16 and chosen["dropout"] in (0.1, 0.3, 0.5)
    markdown = (folder / "tune_results.md").read_text()
    assert f"Winner: trial {record['winner']}" in markdown and "test split" in markdown
    assert markdown.count("\n| ") == 1 + 6  # the header and one row per trial
    assert (folder / "tune_scores.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_the_same_seed_gives_the_same_search(tuned: Path, tmp_path: Path):
    again = tune(tmp_path, "b")
    assert again.returncode == 0, again.stderr[-3000:]
    first, second = rows(tuned / "a" / "tiny" / "1"), rows(tmp_path / "b" / "tiny" / "1")
    for row in first + second:
        del row["seconds"]
    assert first == second
    assert (contract.sha256(tuned / "a" / "tiny" / "1" / "model.onnx")
            == contract.sha256(tmp_path / "b" / "tiny" / "1" / "model.onnx"))
    other = tune(tmp_path, "c", seed=1)
    assert other.returncode == 0, other.stderr[-3000:]
    assert [r["dropout"] for r in rows(tmp_path / "c" / "tiny" / "1")] != [r["dropout"] for r in first] or \
        [r["batch_size"] for r in rows(tmp_path / "c" / "tiny" / "1")] != [r["batch_size"] for r in first]


@pytest.mark.slow
def test_train_with_the_chosen_config_retrains_the_winner(tuned: Path, tmp_path: Path):
    """The winner was trained paused and resumed among other trials; train --config gives the same weights."""
    folder = tuned / "a" / "tiny" / "1"
    result = cli("train", *DATA, "--config", str(folder / "tune_config.json"), "--out", str(tmp_path / "t" / "1"),
                 "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert contract.sha256(tmp_path / "t" / "1" / "model.onnx") == contract.sha256(folder / "model.onnx")


@pytest.mark.slow
def test_without_out_the_results_go_to_their_folder(tmp_path: Path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"dropout": [0.1]}))
    result = cli("tune", *DATA, *TINY, "--budget", "2m", "--trials", "2", "--space", str(space),
                 "--results", str(tmp_path / "results"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "winner on test (touched once)" in result.stdout
    assert {p.name for p in (tmp_path / "results").iterdir()} == {"tune_results.csv", "tune_results.md",
                                                                  "tune_config.json", "tune_scores.png"}
    assert "accuracy" in (tmp_path / "results" / "tune_results.md").read_text()


@pytest.mark.parametrize("space, says", [
    ({"hidden_sise": [8]}, "unknown hyperparameter(s) hidden_sise"),
    ({"seed": [1, 2]}, "seed cannot be searched"),
    ({"dropout": [0.2, 1.5]}, "dropout must be in [0, 1)"),
    ({"epochs": []}, "epochs has no choices"),
    ([1, 2], "search space must be a mapping of hyperparameters"),
])
def test_a_bad_search_space_is_one_line(tmp_path: Path, space, says: str):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    result = cli("tune", *DATA, "--budget", "1m", "--space", str(path))
    assert_one_line_error(result, says)


@pytest.mark.parametrize("budget, says", [("10x", "use seconds or a duration"), ("0", "more than 0 seconds"),
                                          ("", "use seconds or a duration")])
def test_a_bad_budget_is_one_line(budget: str, says: str):
    assert_one_line_error(cli("tune", *DATA, "--budget", budget), says)


@pytest.mark.slow
def test_a_budget_too_small_for_one_trial_is_one_line(tmp_path: Path):
    result = cli("tune", *DATA, "--budget", "1s",
                 "--results", str(tmp_path / "r"))
    assert_one_line_error(result, "too small for one trial")
    assert not (tmp_path / "r").exists()


def test_a_dataset_too_small_to_split_is_one_line(tmp_path: Path):
    (tmp_path / "train.csv").write_text("text,label\nhello,a\nbye,b\nhi,a\n")
    (tmp_path / "test.csv").write_text("text,label\nhello,a\nbye,b\n")
    result = cli("tune", str(tmp_path), "--budget", "1m", "--results", str(tmp_path / "r"))
    assert_one_line_error(result, "class 'b' has 1 row(s)")


def test_results_beside_an_artifact_refuse_a_second_folder(tmp_path: Path):
    result = cli("tune", *DATA, "--budget", "1m", "--out", str(tmp_path / "m" / "1"), "--results", str(tmp_path / "r"))
    assert_one_line_error(result, "--results is for a search without --out")


def test_the_sign_test_is_exact():
    assert sign_test(0, 0) == 1.0 and sign_test(3, 0) == 0.125 and sign_test(6, 1) == 8 / 128
    assert sign_test(25, 5) < 0.001 < sign_test(12, 5) < 0.2


def test_budget_parsing_and_milestones():
    assert parse_budget("10m") == 600 and parse_budget("90s") == 90 and parse_budget("1h30m") == 5400
    assert parse_budget("45") == 45 and parse_budget("2.5m") == 150
    assert ETA == 3 and milestones(15) == [2, 5, 15] and milestones(4) == [1, 2, 4] and milestones(1) == [1]
    assert TrainConfig().epochs == 15  # the default trial's milestones above


def test_a_trial_must_beat_the_default_by_more_than_noise():
    """Sign test on the validation sentences where a trial and the default disagree: 1 sentence ahead of 340 is
    noise; 20 ahead (25 won, 5 lost) is not."""
    from types import SimpleNamespace

    import numpy as np

    from model_export.tune import Search, Trial

    targets = np.zeros(340, dtype=int)

    def trial(number: int, wrong: list[int], score: float) -> Trial:
        predictions = targets.copy()
        predictions[wrong] = 1
        run = SimpleNamespace(best_predictions=predictions, val_targets=targets, seconds=1.0, epoch=1, history=[
            {"val_accuracy": score, "val_macro_f1": score}], best_epoch=1)
        return Trial(number, TrainConfig(), run=run, milestones=[1], scores=[score], complete=True)

    search = Search(None, TrainConfig(), {}, 60, None)
    default = trial(0, list(range(40)), 300 / 340)
    lucky = trial(1, list(range(1, 40)), 301 / 340)  # one sentence ahead
    better = trial(2, list(range(15)) + list(range(40, 45)), 320 / 340)  # 25 won, 5 lost
    search.trials = [default, lucky]
    assert lucky.versus(default) == (1, 0) and not search.beats(lucky) and search.best() is default
    search.trials = [default, lucky, better]
    assert better.versus(default) == (25, 5) and search.beats(better) and search.best() is better
    # Bonferroni: 12 won, 5 lost is p = 0.072 alone; never enough, and less so among more trials
    fair = trial(3, list(range(12, 40)) + list(range(40, 45)), 307 / 340)
    assert fair.versus(default) == (12, 5) and not search.beats(fair)
