"""``python -m model_export import``: a fine-tuned Hugging Face sequence classifier (a local folder) to an artifact
folder in the same contract as ``train`` writes, with the same checks.

The graph is the HF model wrapped so that the output activation (softmax, or a sigmoid per class for
``problem_type: multi_label_classification``) and the fitted temperature are inside it: its one output is always
``probabilities``. Its inputs are what the architecture takes: ``input_ids``, ``attention_mask`` and, where the
tokenizer and the model have them (BERT), ``token_type_ids``. The tokenizer file is the fast tokenizer's (a slow
tokenizer's vocabulary is converted by transformers), and the manifest says ``special_tokens: true``, so the
service adds them exactly as the model was trained; a test checks the ids against transformers' own tokenizer.

Everything a folder can get wrong is found, where it can be, before torch and transformers are imported (a bad
folder costs a fraction of a second): one line naming the folder and the reason, exit code 2.
Nothing is downloaded: the folder must be local (``HF_HUB_OFFLINE``, ``local_files_only``).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import contract

from .data import Dataset, stratified_split
from .errors import UserError

SUPPORTED = ("bert", "distilbert", "roberta", "xlm-roberta")
OFFSET_POSITIONS = ("roberta", "xlm-roberta")  # position ids start after the padding id: 514 positions hold 512
SEQ2SEQ = {"bart", "mbart", "t5", "mt5", "umt5", "longt5", "pegasus", "pegasus_x", "marian", "led", "fsmt",
           "m2m_100", "nllb-moe", "prophetnet", "blenderbot", "blenderbot-small", "plbart", "bigbird_pegasus"}
DECODERS = {"gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "openai-gpt", "ctrl", "llama", "mistral",
            "mixtral", "qwen2", "qwen2_moe", "qwen3", "phi", "phi3", "gemma", "gemma2", "falcon", "bloom", "opt",
            "mpt", "biogpt", "transfo-xl", "xlnet", "stablelm", "starcoder2"}
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"), ("sentencepiece.bpe.model",),
                   ("spiece.model",))
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


# Without --data, parity and batch invariance are measured on these: lengths from 1 to ~60 words, punctuation,
# digits, capitals, accents and an emoji (the tokenizer's full path as well as the plain-ASCII one).
SAMPLE = [
    "Hi", "Thanks!", "Where is my card?", "I lost my wallet.", "Cancel it.", "Why was I charged twice?",
    "How long does a transfer take to arrive?", "My PIN is blocked, what do I do now?",
    "Can I top up with a credit card from another country?", "The exchange rate you gave me was wrong.",
    "I want a refund for the item I returned last week.", "Is there a fee for withdrawing cash abroad?",
    "Please close my account and send the remaining balance to my bank.", "café crème, naïve résumé",
    "What's the daily limit on contactless payments in the UK?", "Does the app work on Android 9 or only iOS?",
    "I ordered a new card 10 days ago and it still hasn't arrived, can you check where it is?",
    "My salary was paid in yesterday but the balance hasn't been updated yet, is something wrong?",
    "THE ATM SWALLOWED MY CARD", "ok", "Got 💳 declined at the store", "Verify my identity",
    "How do I change the name on my account after getting married?", "Why is my top-up still pending?",
    "A payment I don't recognise showed up on my statement from an online shop I've never used.",
    "Can I have a virtual card for one-off online purchases, and how many of them can I create?",
    "Transfer failed", "Is Apple Pay supported?", "I think someone has stolen my phone and can use my account.",
    "Where can I see the fees for sending money to another currency?",
    "I was on holiday in Spain, paid for dinner with my card, and the restaurant says the payment was declined "
    "although I had plenty of money in the account and the card was not frozen; the next day the same card "
    "worked fine at a supermarket, so I would like to know what happened and whether it will happen again.",
    "refund", "Can my 15-year-old open an account?", "How do I get a spare card for my partner?",
    "I got less cash than I asked for from the machine.", "What currencies can I hold?",
    "Why do you need to verify where my money comes from?", "The direct debit was taken twice this month.",
    "Hello, I need help.", "Edit my address",
]


@dataclass
class Folder:
    """What the folder's files say, read without torch or transformers."""

    path: Path
    config: dict[str, Any]
    model_type: str
    labels: list[str]
    multi_label: bool


@dataclass
class Source:
    """The loaded classifier, wrapped for export, and the tokenizer the artifact will carry."""

    folder: Folder
    module: Any  # Probabilities
    tokenizer: Any  # tokenizers.Tokenizer, no padding or truncation
    hf_tokenizer: Any  # what transformers tokenizes with: the reference for the ids
    names: tuple[str, ...]
    max_length: int
    pad_id: int
    unk_id: int


def read_folder(path: Path) -> Folder:
    """The checks that need only the files: a local folder with a supported classifier's config, its tokenizer
    files and readable weights."""
    if not path.exists():
        hint = (f"; if {str(path)!r} is a Hugging Face Hub id, download it first (hf download {path} --local-dir "
                f"DIR) and import DIR" if HUB_ID.fullmatch(str(path)) else "")
        raise UserError(f"{path}: no such folder (import reads a local folder, it downloads nothing){hint}")
    if not path.is_dir():
        raise UserError(f"{path}: not a folder (give the folder save_pretrained wrote)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path}: no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: not a JSON object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise UserError(f"{config_path}: no model_type")
    architectures = config.get("architectures") or []
    families = ", ".join(SUPPORTED)
    if config.get("is_encoder_decoder") or model_type in SEQ2SEQ:
        raise UserError(f"{config_path}: model_type {model_type!r} is a sequence-to-sequence model; import takes "
                        f"encoder classifiers ({families})")
    if model_type in DECODERS or config.get("is_decoder") or any(a.endswith("ForCausalLM") for a in architectures):
        raise UserError(f"{config_path}: model_type {model_type!r} is a decoder-only model; import takes encoder "
                        f"classifiers ({families})")
    if model_type not in SUPPORTED:
        raise UserError(f"{config_path}: model_type {model_type!r} is not supported; import takes {families}")
    if not any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"{config_path}: architectures {architectures} has no sequence-classification head (an "
                        f"...ForSequenceClassification); fine-tune the model for classification first")
    problem = config.get("problem_type")
    if problem not in (None, "single_label_classification", "multi_label_classification"):
        raise UserError(f"{config_path}: problem_type {problem!r} is not classification")
    labels = _labels(config, config_path)
    files = [names for names in TOKENIZER_FILES if all((path / name).is_file() for name in names)]
    if not files:
        raise UserError(f"{path}: no tokenizer (tokenizer.json, vocab.txt, vocab.json + merges.txt, or a "
                        "sentencepiece model); save the tokenizer into the folder too")
    _check_weights(path)
    return Folder(path, config, model_type, labels, problem == "multi_label_classification")


def _labels(config: dict, config_path: Path) -> list[str]:
    """``id2label`` in index order, checked against ``num_labels``."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or len(id2label) < 2:
        raise UserError(f"{config_path}: id2label must name at least two classes")
    try:
        by_index = {int(key): value for key, value in id2label.items()}
    except ValueError:
        raise UserError(f"{config_path}: id2label keys must be class indices") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise UserError(f"{config_path}: id2label indices must be 0..{len(by_index) - 1}")
    labels = [by_index[i] for i in range(len(by_index))]
    if not all(isinstance(label, str) and label for label in labels) or len(set(labels)) != len(labels):
        raise UserError(f"{config_path}: id2label must map each index to a distinct, non-empty name")
    if "num_labels" in config and config["num_labels"] != len(labels):
        raise UserError(f"{config_path}: num_labels={config['num_labels']} but id2label names {len(labels)} classes")
    return labels


def _check_weights(path: Path) -> None:
    """Weights present, and a safetensors file's header covers the file exactly (a truncated download fails)."""
    found = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not found:
        raise UserError(f"{path}: no weights ({' or '.join(WEIGHT_FILES[::2])})")
    if found[0] == "model.safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path / found[0]), framework="numpy") as weights:
                weights.keys()
        except (SafetensorError, OSError) as error:
            raise UserError(f"{path / found[0]}: unreadable, truncated or corrupt ({_one_line(error)})") from None


def load(folder: Folder, log=print) -> Source:
    """The model (eager attention, float32, eval mode) wrapped with its activation, and the tokenizer."""
    import inspect

    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"  # before transformers is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    import transformers
    from tokenizers import Tokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = str(folder.path)
    try:
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to load is the folder's: one line
        raise UserError(f"{path}: cannot load the tokenizer ({_one_line(error)})") from None
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{path}: transformers gives no fast tokenizer for it ({type(hf_tokenizer).__name__})")
    tokenizer = Tokenizer.from_str(backend.to_str())
    tokenizer.no_padding()  # the Encoder pads per batch and truncates to the manifest's max_length
    tokenizer.no_truncation()
    try:
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    except Exception as error:  # noqa: BLE001
        raise UserError(f"{path}: cannot load the model ({_one_line(error)})") from None
    missing = sorted(set(info.get("missing_keys") or ()) | {str(k) for k in info.get("mismatched_keys") or ()})
    if missing:
        raise UserError(f"{path}: the weights lack or mis-shape {len(missing)} tensor(s) ({', '.join(missing[:3])}); "
                        "not a fine-tuned classifier of this config")
    model.eval()
    if model.config.num_labels != len(folder.labels):
        raise UserError(f"{path}: the model has {model.config.num_labels} outputs, id2label {len(folder.labels)}")
    vocab, rows = tokenizer.get_vocab_size(), model.get_input_embeddings().num_embeddings
    if vocab > rows:
        raise UserError(f"{path}: the tokenizer has {vocab} ids but the model's embedding only {rows} rows")
    if hf_tokenizer.pad_token_id is None:
        raise UserError(f"{path}: the tokenizer has no padding token")
    pad_id = hf_tokenizer.pad_token_id
    unk_id = hf_tokenizer.unk_token_id if hf_tokenizer.unk_token_id is not None else pad_id
    positions = model.config.max_position_embeddings
    if folder.model_type in OFFSET_POSITIONS:
        positions -= model.config.pad_token_id + 1
    limit = hf_tokenizer.model_max_length
    max_length = min(positions, limit) if 0 < limit <= 1_000_000 else positions  # transformers' "no limit": 1e30
    specials = tokenizer.post_processor.num_special_tokens_to_add(False) if tokenizer.post_processor else 0
    if max_length <= specials:
        raise UserError(f"{path}: max length {max_length} leaves no room beside {specials} special tokens")
    takes = inspect.signature(model.forward).parameters
    token_types = contract.TOKEN_TYPE_IDS in hf_tokenizer.model_input_names and contract.TOKEN_TYPE_IDS in takes
    names = (contract.INPUT_IDS, contract.ATTENTION_MASK) + ((contract.TOKEN_TYPE_IDS,) if token_types else ())
    module = probabilities_module(model, names, folder.multi_label)
    log(f"loaded {type(model).__name__} ({folder.model_type}, {len(folder.labels)} classes, "
        f"{'sigmoid' if folder.multi_label else 'softmax'}); inputs {', '.join(names)}; max length {max_length}")
    return Source(folder, module, tokenizer, hf_tokenizer, names, max_length, pad_id, unk_id)


def probabilities_module(model, names: tuple[str, ...], sigmoid: bool):
    """``model`` with its activation applied: what the exported graph computes. ``temperature`` (a buffer, 1
    until calibration sets it) divides the logits before the softmax."""
    import torch

    class Probabilities(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("temperature", torch.tensor(1.0))

        def logits(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, tensors)), return_dict=False)[0]

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            logits = self.logits(*tensors)
            return torch.sigmoid(logits) if sigmoid else torch.softmax(logits / self.temperature, dim=-1)

    return Probabilities().eval()


def torch_run(source: Source, sequences: list[list[int]], logits: bool = False, batch_size: int = 64) -> np.ndarray:
    """Torch's probabilities (or logits) for each sequence, in order; batches of similar lengths, fed through
    ``contract.inputs`` as the graph is."""
    import torch

    run = source.module.logits if logits else source.module
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = np.zeros((len(sequences), len(source.folder.labels)), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            feed = contract.inputs([sequences[i] for i in index], source.pad_id, source.names)
            out[index] = run(*(torch.from_numpy(feed[name]) for name in source.names)).numpy()
    return out


def export(source: Source, sample: list[list[int]], path: Path) -> None:
    """The wrapped model to one ``model.onnx``, dynamic batch and sequence axes, checked by onnx.checker.

    Traced on a padded batch of mixed lengths, so the attention-mask path is in the graph. The TorchScript exporter
    (``dynamo=False``), as ``export.export_onnx`` uses and for the same reasons; eager attention, which traces to
    plain MatMul/Softmax ops.
    """
    import warnings

    import onnx
    import torch

    feed = contract.inputs(sample, source.pad_id, source.names)
    axes = {name: {0: "batch", 1: "seq"} for name in source.names} | {contract.PROBABILITIES: {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(source.module, tuple(torch.from_numpy(feed[name]) for name in source.names), str(path),
                          input_names=list(source.names), output_names=[contract.PROBABILITIES], dynamic_axes=axes,
                          opset_version=contract.OPSET, dynamo=False)
    onnx.checker.check_model(str(path))
    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    activation = "Sigmoid" if source.folder.multi_label else "Softmax"
    if activation not in ops:
        raise RuntimeError(f"exported graph lacks the {activation} op: {sorted(ops)}")


def check_ids(source: Source, encoder: contract.Encoder, texts: list[str]) -> None:
    """The artifact's tokenizer, through ``contract.Encoder``, gives transformers' ids (special tokens,
    truncation), or the import stops."""
    expected = source.hf_tokenizer(texts, truncation=True, max_length=source.max_length)[contract.INPUT_IDS]
    got = encoder.encode(texts)[0]
    wrong = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    if wrong:
        raise UserError(f"the converted tokenizer disagrees with transformers' on {len(wrong)} of {len(texts)} "
                        f"sentences (first: {texts[wrong[0]]!r})")


def build(folder: Folder, out: Path, name: str, version: str, dataset: Dataset | None, dataset_info: dict,
          log=print) -> contract.Manifest:
    """Load, calibrate (with labelled data), export, verify, score, and publish ``out``. Returns the manifest."""
    import onnxruntime as ort
    import transformers

    from . import calibration
    from .config import TrainConfig
    from .export import onnx_predict, verify
    from .pipeline import calibration_on_test, drift_record, fit_temperature, library_versions, selective, staged

    started = time.perf_counter()
    if dataset is not None:
        known = set(folder.labels)
        unknown = sorted({*dataset.train.labels, *dataset.test.labels} - known)
        if unknown:
            raise UserError(f"--data labels not in the model's id2label: {', '.join(unknown[:10])}"
                            f"{' ...' if len(unknown) > 10 else ''} (id2label: {', '.join(folder.labels[:10])}"
                            f"{' ...' if len(folder.labels) > 10 else ''})")
    source = load(folder, log)
    labels, multi = folder.labels, folder.multi_label
    encoder = contract.Encoder(source.tokenizer, source.max_length, source.unk_id, special_tokens=True)
    calibrated: dict = {"enabled": False}
    thresholds: dict = {}
    if multi:
        calibrated["reason"] = ("multi-label (sigmoid): temperature scaling is fitted on one softmax over exclusive "
                                "classes; each label here is its own yes/no decision at per_label_threshold")
        thresholds = {"chosen_on": "default", "score": "per-label probability (sigmoid)",
                      "per_label_threshold": contract.MULTI_LABEL_THRESHOLD, "thresholds": []}
    if dataset is None:
        texts, calibrated["reason"] = SAMPLE, calibrated.get("reason", "no labelled data (--data)")
        fit = validation = None
    else:
        config = TrainConfig()
        fit, validation = stratified_split(dataset.train.texts, dataset.train.labels, config.validation_fraction,
                                           config.seed, "validation")
        texts = dataset.test.texts
    index = {label: i for i, label in enumerate(labels)}
    check_ids(source, encoder, texts[:1000] + [" ".join(SAMPLE)])
    if validation is not None:
        validation_targets = np.array([index[label] for label in validation.labels])
    if validation is not None and not multi:
        logits = torch_run(source, encoder.encode(validation.texts)[0], logits=True)
        calibrated, validation_probabilities = fit_temperature(logits, validation_targets)
        source.module.temperature.fill_(calibrated["temperature"])
        log(f"calibration: temperature {calibrated['temperature']:.3f} (validation NLL "
            f"{calibrated['validation_nll_before']:.4f} -> {calibrated['validation_nll_after']:.4f})")

    with staged(out) as staging:
        source.tokenizer.save(str(staging / "tokenizer.json"))
        contract.write_json(staging / "labels.json", labels)
        ids = encoder.encode(texts)[0]
        export(source, ids[:3] if len(ids) >= 3 else ids + ids, staging / "model.onnx")
        checks, probabilities = verify(staging / "model.onnx", ids, torch_run(source, ids), source.pad_id,
                                       source.names, contract.ENCODER_PARITY_TOLERANCE)
        checks["sentences"] = "the test split of --data" if dataset is not None else "a built-in sample"
        metrics: dict = {}
        drift: dict = {}
        if dataset is not None:
            targets = np.array([index[label] for label in dataset.test.labels])
            metrics = _metrics(probabilities, targets, labels, multi)
            session = ort.InferenceSession(str(staging / "model.onnx"), providers=[contract.CPU])
            fit_ids, validation_ids = encoder.encode(fit.texts)[0], encoder.encode(validation.texts)[0]
            validation_probabilities = onnx_predict(session, validation_ids, source.pad_id, names=source.names)
            if not multi:
                uncalibrated = calibration.softmax(torch_run(source, ids, logits=True))
                calibrated |= calibration_on_test(uncalibrated, probabilities, targets)
                thresholds = selective(validation_probabilities, validation_targets, probabilities, targets)
            drift = drift_record(fit_ids, onnx_predict(session, fit_ids, source.pad_id, names=source.names),
                                 validation_probabilities, source.unk_id)
        manifest = contract.Manifest(
            name=name,
            version=version,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            files=contract.file_entries(staging),
            num_classes=len(labels),
            max_length=source.max_length,
            pad_id=source.pad_id,
            unk_id=source.unk_id,
            vocab_size=source.tokenizer.get_vocab_size(),
            opset=contract.OPSET,
            model_kind="encoder",
            activation="sigmoid" if multi else "softmax",
            special_tokens=True,
            inputs={name: contract.INPUT_DOCS[name] for name in source.names},
            outputs={contract.PROBABILITIES: f"float32 [batch, num_classes], "
                                             f"{'sigmoid per class' if multi else 'softmax'} applied"},
            dataset=dataset_info | ({"train_rows": len(fit), "validation_rows": len(validation),
                                     "test_rows": len(dataset.test), "skipped_empty_texts": dataset.skipped_empty}
                                    if dataset is not None else {}),
            metrics=metrics,
            training={"imported_from": str(folder.path.resolve()), "model_type": folder.model_type,
                      "architecture": type(source.module.model).__name__,
                      "problem_type": "multi_label_classification" if multi else "single_label_classification",
                      "config": {key: folder.config.get(key) for key in (
                          "hidden_size", "dim", "num_hidden_layers", "n_layers", "max_position_embeddings",
                          "vocab_size", "transformers_version") if key in folder.config}},
            verification=checks,
            calibration=calibrated,
            selective=thresholds,
            drift=drift,
            versions=library_versions() | {"transformers": transformers.__version__},
        )
        contract.write_manifest(staging, manifest)
        contract.check(staging)  # what the service will check at start, before the folder is published
    summary = (f"test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}; "
               if metrics else "")
    log(f"{summary}parity {checks['parity_max_abs_diff']:.1e}, batch invariance "
        f"{checks['batch_invariance_max_abs_diff']:.1e} ({checks['batch_invariance_argmax_changes']} argmax changes) "
        f"on {len(ids)} sentences; wrote {out} in {time.perf_counter() - started:.0f}s")
    return manifest


def _metrics(probabilities: np.ndarray, targets: np.ndarray, labels: list[str], multi: bool) -> dict:
    """Test accuracy and macro-F1. Multi-label: each row's gold set is its one label; a row is right when the
    labels at or above ``contract.MULTI_LABEL_THRESHOLD`` are exactly that set; macro-F1 over the labels' yes/no
    decisions."""
    from sklearn.metrics import accuracy_score, f1_score

    from .report import test_metrics

    if not multi:
        return test_metrics(targets, probabilities.argmax(1), labels)[0]
    gold = np.zeros(probabilities.shape, dtype=bool)
    gold[np.arange(len(targets)), targets] = True
    predicted = probabilities >= contract.MULTI_LABEL_THRESHOLD
    return {"accuracy": float(accuracy_score(gold, predicted)),
            "macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0)),
            "test_rows": int(len(targets)), "threshold": contract.MULTI_LABEL_THRESHOLD, "accuracy_is": "exact set match"}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]
