"""``model_export tune``: asynchronous successive halving (ASHA) over training configurations, in a wall-clock
budget, scored on the validation split only.

Why ASHA: on 2 cores a 10-minute budget holds about ten full trainings of a small dataset and three of Banking77.
Most configurations show that they are poor after a ninth of their schedule, so every sampled configuration gets
that much, the best third of those reaching each milestone go on to a third of their schedule, and the best third
of those to the end (``ETA`` = 3, milestones at 1/9, 1/3 and all of a trial's epochs). Trials are paused and
resumed (``train.Training``), so no epoch is trained twice. The default configuration runs first, to the end: it
is the baseline every figure is compared with and the clock's first measurement. Only trials that ran their
whole schedule (or stopped early on validation) can win, so ``train --config`` with the winner's configuration
retrains the same model.

Why a trial must beat the default by more than noise: on a small dataset the validation split is a few hundred
sentences, where one sentence is 0.3 points, and the best of dozens of trials wins partly by luck (measured on
``cr``, 340 validation sentences: the trial one sentence ahead of the default on validation was 4.8 points behind
it on test). So a trial replaces the default only if, on the validation sentences where the two disagree, it is
right significantly more often: an exact one-sided sign test at 5%, Bonferroni-corrected for the number of
complete trials compared (``beats``); the best such trial wins, else the default.

Deterministic for a seed while the budget lasts: configurations are drawn from a seeded generator and every
decision depends on validation scores only, except where the budget cuts the search short (that depends on the
machine's speed; the results table says where it stopped).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import contract

from .config import TrainConfig, load_config, read_mapping
from .data import Dataset
from .errors import UserError

if TYPE_CHECKING:  # torch: imported when a search starts, not while its arguments are checked
    from .pipeline import Prepared
    from .train import Training

ETA = 3
ALPHA = 0.05  # the sign test's level, shared by all the complete trials compared with the default
# What matters for this model, with choices around the defaults (``--space`` replaces any of them).
SPACE: dict[str, list] = {
    "embedding_dim": [64, 128, 256],
    "hidden_size": [64, 128, 256],
    "bidirectional": [True, False],
    "dropout": [0.1, 0.3, 0.5],
    "embedding_dropout": [0.0, 0.1, 0.25, 0.4],
    "learning_rate": [1e-3, 2e-3, 3e-3, 5e-3],
    "epochs": [8, 15, 25],
    "vocab_size": [2000, 4000, 8000, 16000],
    "max_length": [32, 64],
    "label_smoothing": [0.0, 0.1, 0.2],
    "batch_size": [16, 32, 64],
    "weight_decay": [0.01, 0.1],
}
# Not searched: they define the comparison (seed, validation split) or the machine (threads), not the model.
FIXED = {"seed", "validation_fraction", "threads", "calibrate"}


def parse_budget(text: str) -> float:
    """'10m', '90s', '1h', '1h30m' or plain seconds -> seconds (> 0)."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
        if not text or parts is None:
            raise UserError(f"--budget {text!r}: use seconds or a duration such as 90s, 10m, 1h30m")
        hours, minutes, secs = (float(part or 0) for part in parts.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds <= 0:
        raise UserError(f"--budget must be more than 0 seconds, got {text!r}")
    return seconds


def load_space(path: Path | None, fixed: set[str]) -> dict[str, list]:
    """The search space: ``SPACE`` with a JSON/TOML file's entries replacing it (a list of choices, or one value
    to fix it), less the hyperparameters fixed by flags. Every choice is checked as the training would check it."""
    space = dict(SPACE)
    if path is not None:
        given = read_mapping(path, "search space")
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise UserError(f"{path}: unknown hyperparameter(s) {', '.join(unknown)}; searchable: "
                            f"{', '.join(sorted(known - FIXED))}")
        for key, choices in given.items():
            if key in FIXED:
                raise UserError(f"{path}: {key} cannot be searched (it is fixed for the whole search; set it "
                                f"with --{key.replace('_', '-')} or --config)")
            choices = choices if isinstance(choices, list) else [choices]
            if not choices:
                raise UserError(f"{path}: {key} has no choices")
            space[key] = choices
    space = {key: choices for key, choices in space.items() if key not in fixed}
    for key, choices in space.items():
        checked = []
        for choice in choices:
            try:
                checked.append(getattr(load_config(None, {key: choice}), key))
            except UserError as error:
                raise UserError(f"search space: {error}") from None
        space[key] = list(dict.fromkeys(checked))
    return space


@dataclass
class Trial:
    number: int
    config: TrainConfig
    run: Training | None = None
    milestones: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # best validation accuracy at each milestone reached
    complete: bool = False

    @property
    def rung(self) -> int:
        return len(self.scores)

    @property
    def score(self) -> float:
        """Best validation accuracy at the last milestone reached (or so far, if cut before the first)."""
        if self.scores:
            return self.scores[-1]
        return self.run.best_accuracy if self.run and self.run.epoch else 0.0

    @property
    def seconds(self) -> float:
        return self.run.seconds if self.run else 0.0

    @property
    def seconds_per_epoch(self) -> float | None:
        return self.run.seconds / self.run.epoch if self.run and self.run.epoch else None

    def versus(self, default: Trial) -> tuple[int, int]:
        """(validation sentences this trial gets right and the default wrong, and the reverse)."""
        if self.run is None or default.run is None or self.run.best_predictions is None:
            return 0, 0
        targets = default.run.val_targets
        mine, theirs = self.run.best_predictions == targets, default.run.best_predictions == targets
        return int((mine & ~theirs).sum()), int((~mine & theirs).sum())

    def row(self) -> dict:
        history = self.run.history if self.run else []
        best = max(history, key=lambda h: h["val_accuracy"], default=None)
        return {"trial": self.number, "status": "complete" if self.complete else f"stopped at rung {self.rung}",
                "epochs_run": self.run.epoch if self.run else 0, "best_epoch": self.run.best_epoch if self.run else 0,
                "val_accuracy": round(best["val_accuracy"], 4) if best else None,
                "val_macro_f1": round(best["val_macro_f1"], 4) if best else None,
                "seconds": round(self.seconds, 1)}


def milestones(epochs: int) -> list[int]:
    """Epochs at which a trial is compared with the others: 1/9, 1/3 and all of its schedule."""
    return sorted({max(1, math.ceil(epochs / ETA**2)), max(1, math.ceil(epochs / ETA)), epochs})


@dataclass
class Search:
    """The state of one search: every trial, the prepared data per vocabulary/length, the clock."""

    dataset: Dataset
    base: TrainConfig
    space: dict[str, list]
    budget_s: float
    max_trials: int | None
    log: Callable[[str], None] = print
    trials: list[Trial] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    stopped_by: str = ""
    _prepared: dict[tuple[int, int], Prepared] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.base.seed)

    # -- the clock -------------------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _epoch_estimate(self, trial: Trial) -> float:
        """Seconds one more epoch of ``trial`` takes: its own pace, else the slowest pace seen so far."""
        paces = [t.seconds_per_epoch for t in self.trials if t.seconds_per_epoch]
        return trial.seconds_per_epoch or max(paces, default=0.0)

    # -- configurations ----------------------------------------------------------------------------------------
    def prepared(self, config: TrainConfig) -> Prepared:
        key = (config.vocab_size, config.max_length)
        if key not in self._prepared:
            from .pipeline import prepare

            self._prepared[key] = prepare(self.dataset, config)
        return self._prepared[key]

    def _new_config(self) -> TrainConfig | None:
        """A configuration not tried yet, drawn from the space; None when the space is exhausted."""
        size = math.prod(len(choices) for choices in self.space.values())
        for _ in range(100):
            if len(self._seen) >= size + 1:  # every combination (and the default) tried
                return None
            config = replace(self.base, **{key: self.rng.choice(choices) for key, choices in self.space.items()})
            if self._remember(config):
                return config
        return None

    def _remember(self, config: TrainConfig) -> bool:
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def _add(self, config: TrainConfig) -> Trial:
        trial = Trial(len(self.trials), config, milestones=milestones(config.epochs))
        self.trials.append(trial)
        return trial

    # -- running ---------------------------------------------------------------------------------------------
    def advance(self, trial: Trial, must_finish: bool = False) -> bool:
        """Train ``trial`` to its next milestone (or to its end when it stops early). Returns False when the
        budget ran out first (the trial stays paused where it was)."""
        if trial.run is None:
            trial.run = self.prepared(trial.config).training(trial.config)
        target = trial.milestones[trial.rung]
        while trial.run.epoch < target and not trial.run.done:
            if not must_finish and self.elapsed + self._epoch_estimate(trial) > self.budget_s:
                return False
            trial.run.run_epoch()
            if must_finish and trial.run.epoch == 1:
                self._check_budget_fits(trial)
        if trial.run.done:
            trial.scores += [trial.run.best_accuracy] * (len(trial.milestones) - trial.rung)
        else:
            trial.scores.append(trial.run.best_accuracy)
        if trial.rung == len(trial.milestones):
            trial.complete = True
            trial.run.release()
        self._report(trial)
        return True

    def _check_budget_fits(self, trial: Trial) -> None:
        estimate = trial.seconds_per_epoch * trial.config.epochs
        if estimate > self.budget_s:
            raise UserError(f"--budget {self.budget_s:.0f}s is too small for one trial: the default configuration "
                            f"takes about {estimate:.0f}s to train here ({trial.seconds_per_epoch:.1f}s per epoch, "
                            f"{trial.config.epochs} epochs); give at least {math.ceil(estimate * 1.5)}s")

    def _report(self, trial: Trial) -> None:
        best = self.best()
        state = "done" if trial.complete else f"milestone {trial.rung}/{len(trial.milestones)}"
        changed = {k: getattr(trial.config, k) for k in self.space if getattr(trial.config, k) != getattr(self.base, k)}
        self.log(f"trial {trial.number:3d} {state:<13} epoch {trial.run.epoch:2d}/{trial.config.epochs:<2d} "
                 f"val {trial.score:.4f} (winner so far {best.score if best else 0:.4f}) "
                 f"{self.elapsed:5.0f}s/{self.budget_s:.0f}s  {_short(changed) or 'default'}")

    def promotable(self, finishing: bool = False) -> Trial | None:
        """A paused trial in the best 1/ETA of the trials that reached its milestone (highest milestone first).
        ``finishing`` (no new configuration can start): the best one of a milestone goes on even if fewer than
        ETA reached it."""
        for rung in range(max((t.rung for t in self.trials), default=0), 0, -1):
            reached = [t for t in self.trials if t.rung >= rung]
            ranked = sorted(reached, key=lambda t: (-t.scores[rung - 1], t.number))
            quota = max(1, len(reached) // ETA) if finishing else len(reached) // ETA
            for trial in ranked[:quota]:
                if not trial.complete and trial.rung == rung:
                    return trial
        return None

    def beats(self, trial: Trial) -> bool:
        """Whether ``trial`` is right on significantly more of the validation sentences where it and the default
        disagree: exact one-sided sign test at ``ALPHA`` over the complete trials compared (Bonferroni)."""
        compared = max(1, sum(t.complete for t in self.trials[1:]))
        return sign_test(*trial.versus(self.trials[0])) < ALPHA / compared

    def best(self) -> Trial | None:
        """The winner: among the complete trials that beat the default (and the default itself), the best
        validation accuracy (then macro-F1, then the earliest)."""
        complete = [t for t in self.trials if t.complete and (t.number == 0 or self.beats(t))]
        return min(complete, key=lambda t: (-t.score, -(t.row()["val_macro_f1"] or 0), t.number), default=None)

    def finishing_cost(self, trial: Trial) -> float:
        return (trial.config.epochs - trial.run.epoch) * self._epoch_estimate(trial) if trial.run else math.inf

    def run(self) -> Trial:
        """Search until the budget, the trial cap or the space runs out; returns the winner."""
        default = self._add(self.base)
        self._remember(self.base)
        while not default.complete:
            self.advance(default, must_finish=True)
        exhausted = False
        while True:
            candidate = self.promotable()
            capped = self.max_trials is not None and len(self.trials) >= self.max_trials
            if candidate is None and not capped and not exhausted:
                config = self._new_config()
                exhausted = config is None
                if config is not None:
                    if not self._finish_leader_if_the_end_is_near(config):
                        self.stopped_by = "the budget (its last part went to finishing the leading paused trial)"
                        break
                    candidate = self._add(config)
            if candidate is None:  # nothing new can start: the best paused trial of a milestone goes on
                candidate = self.promotable(finishing=True)
                if candidate is None:
                    self.stopped_by = ("the trial cap (--trials)" if capped else "the search space running out"
                                       ) + "; the trials halving left paused stay paused"
                    break
            if not self.advance(candidate):
                self.stopped_by = "the budget"
                if candidate.run is not None and candidate.run.epoch == 0:
                    self.trials.remove(candidate)
                break
        winner = self.best()
        assert winner is not None  # the default always completes
        self.log(f"stopped by {self.stopped_by} after {len(self.trials)} trial(s), "
                 f"{sum(t.complete for t in self.trials)} complete, {self.elapsed:.0f}s; winner trial "
                 f"{winner.number} (validation accuracy {winner.score:.4f}; default {default.score:.4f})")
        return winner

    def _finish_leader_if_the_end_is_near(self, config: TrainConfig) -> bool:
        """When starting ``config`` would leave too little budget to finish the most promising paused trial,
        finish that one first. Returns False when the budget ran out doing so."""
        paused = [t for t in self.trials if not t.complete and t.run is not None]
        if not paused:
            return True
        leader = max(paused, key=lambda t: (t.rung, t.score, -t.number))
        first_milestone = max(self._epoch_estimate(t) for t in self.trials) * milestones(config.epochs)[0]
        if self.elapsed + first_milestone + self.finishing_cost(leader) > self.budget_s:
            while not leader.complete:
                if not self.advance(leader):
                    return False
        return True


def sign_test(wins: int, losses: int) -> float:
    """P(at least ``wins`` of ``wins + losses`` fair coin flips): the one-sided p-value that a trial which won
    ``wins`` and lost ``losses`` of the disputed validation sentences is no better than the default."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def _short(values: dict) -> str:
    names = {"embedding_dim": "emb", "hidden_size": "hid", "bidirectional": "bi", "dropout": "drop",
             "embedding_dropout": "edrop", "learning_rate": "lr", "epochs": "ep", "vocab_size": "vocab",
             "max_length": "len", "label_smoothing": "ls", "batch_size": "bs", "weight_decay": "wd"}
    return " ".join(f"{names.get(k, k)}={v}" for k, v in values.items())


def results(search: Search, winner: Trial) -> list[dict]:
    """One row per trial: its configuration (searched keys), scores, its sentences won/lost against the default on
    validation, time and whether it won."""
    rows = []
    for t in search.trials:
        wins, losses = t.versus(search.trials[0])
        rows.append({**t.row(), "vs_default": f"+{wins}/-{losses}" if t.number else "",
                     "beats_default": search.beats(t) if t.number and t.complete else "", "winner": t is winner,
                     **{key: getattr(t.config, key) for key in search.space}})
    return rows


def write_results(folder: Path, search: Search, winner: Trial, test: dict | None, limit: str = "") -> None:
    """tune_results.csv / .md, tune_scores.png, and tune_config.json (``train --config`` retrains the winner)."""
    import csv

    from .report import plot_tune

    folder.mkdir(parents=True, exist_ok=True)
    rows = results(search, winner)
    with open(folder / "tune_results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = list(rows[0])
    lines = [f"# Tuning results: {search.dataset.name}", "",
             f"Asynchronous successive halving (eta {ETA}), budget {search.budget_s:.0f}s, seed {search.base.seed}; "
             f"{len(rows)} trials, {sum(t.complete for t in search.trials)} complete; stopped by "
             f"{search.stopped_by}. Scores are validation accuracy and macro-F1 at each trial's best epoch; trial 0 "
             f"is the default configuration; vs_default counts the validation sentences a trial gets right and the "
             f"default wrong, and the reverse; a complete trial can win only if that lead is significant (exact "
             f"one-sided sign test at 5%, Bonferroni-corrected over the complete trials). Winner: trial "
             f"{winner.number}.", ""]
    if test is not None:
        lines += [f"Winner on the test split (touched once, after the search): accuracy {test['accuracy']:.4f}, "
                  f"macro-F1 {test['macro_f1']:.4f}.", ""]
    lines += [f"`python -m model_export train DATA --config tune_config.json{limit} --out ...` retrains the winner "
              f"(the same data flags as this search).", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if row[c] is None else str(row[c]) for c in columns) + " |" for row in rows]
    (folder / "tune_results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    contract.write_json(folder / "tune_config.json", winner.config.to_dict())
    plot_tune([t.number for t in search.trials], [t.score for t in search.trials],
              [t.complete for t in search.trials], winner.number, folder / "tune_scores.png")


def record(search: Search, winner: Trial) -> dict:
    """The search, for the manifest's ``training.tune``."""
    return {"method": f"asynchronous successive halving (eta {ETA}, milestones at 1/9, 1/3 and all epochs)",
            "budget_s": search.budget_s, "elapsed_s": round(search.elapsed, 1), "seed": search.base.seed,
            "trials": len(search.trials), "complete": sum(t.complete for t in search.trials),
            "stopped_by": search.stopped_by, "winner": winner.number,
            "selection": "the best complete trial on validation accuracy among those that beat the default "
                         "(exact one-sided sign test at 5%, Bonferroni over the complete trials, on the validation "
                         "sentences where they disagree), else the default",
            "winner_validation_accuracy": winner.score, "default_validation_accuracy": search.trials[0].score,
            "space": search.space}
