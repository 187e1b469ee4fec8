"""``python -m model_export``: train (and export, verify) an artifact or import a fine-tuned Hugging Face
classifier as one, evaluate it, check it, benchmark it."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .config import TrainConfig, load_config
from .errors import UserError


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="a folder with train/test .csv/.tsv/.jsonl files, or one such file")
    parser.add_argument("--text-column", default="text", help="column holding the sentence (default: text)")
    parser.add_argument("--label-column", default="label", help="column holding the class (default: label)")
    parser.add_argument("--test-fraction", type=float, help="with one file: the share held out as the test split")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="JSON or TOML file of hyperparameters")
    parser.add_argument("--limit", type=int, help="train on a stratified sample of about N training rows (quick runs)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    hyper = parser.add_argument_group("hyperparameters (override --config)")
    for field in fields(TrainConfig):
        kind = {bool: lambda v: v, int: int, float: float}[type(field.default)]
        hyper.add_argument(f"--{field.name.replace('_', '-')}", dest=f"hp_{field.name}", type=kind, metavar="V",
                           help=f"default {field.default}")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error of this command
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m model_export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="train, evaluate, export to ONNX and verify: writes an artifact folder")
    _add_data_arguments(train)
    train.add_argument("--out", type=Path, required=True, help="artifact folder to write, e.g. models/banking77/1")
    train.add_argument("--name", help="model name in the manifest (default: the --out parent folder's name)")
    train.add_argument("--force", action="store_true", help="replace --out if it exists")
    train.add_argument("--oos-label", help="rows with this label are out of scope: never trained on, used to choose "
                       "the abstention threshold on validation and scored on test")
    train.add_argument("--oos-classes", default="", help="open-set protocol: comma-separated classes held out of "
                       "training entirely, their sentences out of scope (labelled --oos-label, default oos)")
    train.add_argument("--oos-recall", type=float, default=0.9,
                       help="out-of-scope recall the threshold must reach on validation (default 0.9)")
    _add_training_arguments(train)

    seeds = commands.add_parser("seeds", help="train with several seeds and print test accuracy, mean and spread "
                                "(no artifact written)")
    _add_data_arguments(seeds)
    seeds.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    _add_training_arguments(seeds)

    tune = commands.add_parser("tune", help="search training configurations within a time budget on the validation "
                               "split; write the results and, with --out, export the winner")
    _add_data_arguments(tune)
    tune.add_argument("--budget", required=True, help="wall-clock budget for the search: 600, 90s, 10m, 1h30m")
    tune.add_argument("--out", type=Path, help="artifact folder to export the winner to, e.g. models/cr/1")
    tune.add_argument("--results", type=Path, help="without --out: folder for the results table, plot and config "
                      "(default tune-<dataset>); with --out they go into the artifact folder")
    tune.add_argument("--trials", type=int, help="at most N configurations, the default's included (default: as "
                      "many as the budget holds)")
    tune.add_argument("--space", type=Path, help="JSON or TOML file: hyperparameter -> list of choices, replacing "
                      "the built-in choices for those keys (one value fixes it)")
    tune.add_argument("--name", help="model name in the manifest (default: the --out parent folder's name)")
    tune.add_argument("--force", action="store_true", help="replace --out if it exists")
    _add_training_arguments(tune)

    hf = commands.add_parser("import", help="a fine-tuned Hugging Face sequence classifier (a local folder) to an "
                             "artifact folder: ONNX export, parity and batch-invariance checks, and with --data "
                             "test scores, calibration, thresholds and the drift reference")
    hf.add_argument("folder", type=Path, help="the folder save_pretrained wrote: config.json, weights, tokenizer")
    hf.add_argument("--out", type=Path, required=True, help="artifact folder to write, e.g. models/sentiment/1")
    hf.add_argument("--name", help="model name in the manifest (default: the --out parent folder's name)")
    hf.add_argument("--force", action="store_true", help="replace --out if it exists")
    hf.add_argument("--data", help="labelled sentences (a folder with train/test files, or one file with "
                    "--test-fraction) whose labels are id2label's names")
    hf.add_argument("--text-column", default="text", help="column holding the sentence (default: text)")
    hf.add_argument("--label-column", default="label", help="column holding the class (default: label)")
    hf.add_argument("--test-fraction", type=float, help="with one --data file: the share held out as the test split")

    evaluate = commands.add_parser("evaluate", help="accuracy and macro-F1 of an artifact on a dataset's test split")
    evaluate.add_argument("artifact", type=Path)
    _add_data_arguments(evaluate)

    check = commands.add_parser("check", help="check an artifact folder against the contract (files, hashes, shapes)")
    check.add_argument("artifact", type=Path)

    bench = commands.add_parser("bench", help="onnxruntime sentences/s at batch 1 and 64, grouped or not, 1-2 threads")
    bench.add_argument("artifact", type=Path)
    _add_data_arguments(bench)
    bench.add_argument("--seconds", type=float, default=2.0, help="time per measurement (default 2)")
    bench.add_argument("--tokenize", action="store_true", help="count tokenization in each run, as a server must")
    return parser


def _load(args):
    from .data import load_dataset

    return load_dataset(args.data, args.text_column, args.label_column, args.test_fraction)


def _artifact(folder: Path):
    """The checked artifact (``contract.check``: files, hashes, manifest, tokenizer, graph, a test run)."""
    import contract

    try:
        return contract.check(folder)
    except contract.ArtifactError as error:
        raise UserError(str(error)) from None


def _config_and_data(args):
    """The training config and the dataset (sampled down with ``--limit``)."""
    from .data import stratified_split

    overrides = {f.name: getattr(args, f"hp_{f.name}") for f in fields(TrainConfig)}
    config = load_config(args.config, overrides)
    dataset = _load(args)
    if args.limit is not None:
        if args.limit < 2 * len(set(dataset.train.labels)):
            raise UserError(f"--limit must be at least twice the number of classes ({len(set(dataset.train.labels))})")
        if args.limit < len(dataset.train):
            _, dataset.train = stratified_split(dataset.train.texts, dataset.train.labels,
                                                args.limit / len(dataset.train), config.seed, "--limit")
    return config, dataset


def _check_out(args) -> None:
    """``--out`` is writable, empty (or ``--force``) and an integer version folder."""
    from .folders import check_output_folder

    check_output_folder(args.out, args.force)
    if not args.out.name.isdigit():
        raise UserError(f"--out {args.out}: the last part must be an integer version folder, as in "
                        f"models/<name>/1 (the service serves models/<name>/<version>/)")


def command_train(args) -> None:
    _check_out(args)
    from .openset import separate

    config, dataset = _config_and_data(args)
    classes = [c.strip() for c in args.oos_classes.split(",") if c.strip()]
    dataset, oos = separate(dataset, args.oos_label, classes, args.oos_recall)
    name = args.name or args.out.resolve().parent.name
    info = {"name": dataset.name, "text_column": args.text_column, "label_column": args.label_column,
            "licence": _licence(Path(args.data))}
    if oos is not None:
        info |= {"oos_label": oos.label, "held_out_classes": oos.held_out_classes,
                 "oos_rows": {"train": len(oos.train_texts), "test": len(oos.test_texts)}}
    from .pipeline import build_artifact  # torch: only once the arguments and the data passed their checks

    build_artifact(dataset, config, args.out, name, args.out.name, info, progress=not args.no_progress, oos=oos)


def _licence(data: Path) -> str:
    """The dataset's licence, read from a README beside it (first line naming one), else 'unknown'."""
    folder = data if data.is_dir() else data.parent
    readme = folder / "README.md"
    if readme.is_file():
        for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
            if "licen" in line.lower() and "attribution" in line.lower():
                return line.split(":", 1)[-1].strip().rstrip(".")
    return "unknown"


def command_tune(args) -> None:
    from .folders import check_output_folder
    from .tune import Search, load_space, parse_budget, record, write_results

    budget = parse_budget(args.budget)
    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    if args.results is not None and args.out is not None:
        raise UserError("--results is for a search without --out; with --out the results go into the artifact folder")
    if args.out is not None:
        _check_out(args)
    fixed = {f.name for f in fields(TrainConfig) if getattr(args, f"hp_{f.name}") is not None}
    space = load_space(args.space, fixed)
    config, dataset = _config_and_data(args)
    results = args.results or Path(f"tune-{dataset.name}")
    limit = f" --limit {args.limit}" if args.limit is not None else ""  # the same rows: --limit is not a hyperparameter
    if args.out is None:
        check_output_folder(results, args.force)
    from .pipeline import build_artifact, test_scores  # torch: only once the arguments and the data passed

    search = Search(dataset, config, space, budget, args.trials)
    winner = search.run()
    fitted = search.prepared(winner.config).fitted(winner.run.result())
    tuning = record(search, winner)
    if args.out is None:
        test = test_scores(fitted, dataset, winner.config.max_length)
        write_results(results, search, winner, test, limit)
        print(f"winner on test (touched once): accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}; "
              f"wrote {results}/tune_results.md and tune_config.json (train --config {results}/tune_config.json"
              f"{limit} retrains it)")
        return
    info = {"name": dataset.name, "text_column": args.text_column, "label_column": args.label_column,
            "licence": _licence(Path(args.data))}
    def extras(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        write_results(folder, search, winner, manifest["metrics"], limit)

    build_artifact(dataset, winner.config, args.out, args.name or args.out.resolve().parent.name, args.out.name,
                   info, progress=False, fitted=fitted, tuning=tuning, extras=extras)
    print(f"wrote {args.out} with the winner (tune_results.md, tune_config.json beside the model; "
          f"train --config {args.out}/tune_config.json{limit} retrains it)")


def command_import(args) -> None:
    from .hf_import import build, read_folder

    folder = read_folder(args.folder)
    _check_out(args)
    dataset, info = None, {}
    if args.data is not None:
        dataset = _load(args)
        info = {"name": dataset.name, "text_column": args.text_column, "label_column": args.label_column,
                "licence": _licence(Path(args.data))}
    build(folder, args.out, args.name or args.out.resolve().parent.name, args.out.name, dataset, info)


def command_seeds(args) -> None:
    import statistics
    import time

    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    config, dataset = _config_and_data(args)
    from .pipeline import fit_model, test_scores  # torch: only once the arguments and the data passed their checks

    accuracies = []
    for seed in seeds:
        config.seed = seed
        started = time.perf_counter()
        fitted = fit_model(dataset, config, progress=not args.no_progress, log=lambda _: None)
        accuracies.append(test_scores(fitted, dataset, config.max_length)["accuracy"])
        print(f"seed {seed}: test accuracy {accuracies[-1]:.4f}, validation {fitted.result.best_val_accuracy:.4f} "
              f"(epoch {fitted.result.best_epoch}), {time.perf_counter() - started:.0f}s", flush=True)
    spread = max(accuracies) - min(accuracies)
    print(f"mean test accuracy {statistics.mean(accuracies):.4f} over {len(seeds)} seed(s), "
          f"min {min(accuracies):.4f}, max {max(accuracies):.4f}, spread {spread:.4f}")


def command_evaluate(args) -> None:
    artifact = _artifact(args.artifact)
    test = _load(args).test
    unknown = sorted(set(test.labels) - set(artifact.labels))
    if unknown:
        raise UserError(f"test labels not known to the model: {', '.join(unknown[:5])}")
    import numpy as np

    from .export import onnx_predict  # torch: only once the artifact and the data passed their checks
    from .report import test_metrics

    manifest = artifact.manifest
    sequences = _encode(artifact, test.texts)
    predictions = onnx_predict(artifact.session, sequences, manifest.pad_id, names=manifest.input_names).argmax(1)
    index = {label: i for i, label in enumerate(artifact.labels)}
    metrics, report = test_metrics(np.array([index[label] for label in test.labels]), predictions, artifact.labels)
    print(report)
    print(json.dumps({"accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
                      "rows": len(test)}))


def _encode(artifact, texts: list[str]) -> list[list[int]]:
    return artifact.encoder.encode(texts)[0]


def command_check(args) -> None:
    manifest = _artifact(args.artifact).manifest
    print(f"{args.artifact}: ok ({manifest.name} v{manifest.version}, {manifest.num_classes} classes)")


def command_bench(args) -> None:
    from .bench import bench

    _artifact(args.artifact)
    rows = bench(args.artifact, _load(args).test.texts, seconds=args.seconds, tokenize=args.tokenize)
    print("| threads | batch | length-grouped | tokenized | sentences/s |\n|---:|---:|:---:|:---:|---:|")
    for row in rows:
        print(f"| {row['threads']} | {row['batch']} | {'yes' if row['grouped'] else 'no'} "
              f"| {'yes' if row['tokenize'] else 'no'} | {row['sentences_per_s']:,} |")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"train": command_train, "tune": command_tune, "import": command_import, "seeds": command_seeds,
         "evaluate": command_evaluate, "check": command_check, "bench": command_bench}[args.command](args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
