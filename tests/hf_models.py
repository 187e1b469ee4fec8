"""Tiny fine-tuned-looking Hugging Face classifier folders, built here without any download, for the tests of
``python -m model_export import`` and of serving imported encoders.

Each folder is what ``save_pretrained`` writes for a sequence classifier: ``config.json``, ``model.safetensors``
and the tokenizer files. The tokenizers are trained on the Banking77 training sentences with the ``tokenizers``
library (WordPiece for the BERT family, byte-level BPE for the RoBERTa family, 2,000 ids); the weights are
random (seeded) and the models narrow (2 layers, 64 wide), so a folder builds in about a second.

    from hf_models import build              # in tests (tests/ is on sys.path)
    build("bert", folder)                     # one folder; KINDS lists them all
    python -m tests.hf_models OUT_DIR [KIND ...]   # OUT_DIR/<kind>/ for each kind (all by default)
"""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CSV = ROOT / "data" / "banking77" / "train.csv"
VOCAB_SIZE = 2000
MAX_POSITIONS = 128
# Far wider than a real initialisation (0.02): sharp attention and confident, varied outputs like a fine-tuned
# model's, so parity and invariance are measured on probabilities far from uniform (1/77 everywhere hides errors).
INIT = 0.2

# kind -> what it is: bert, distilbert, roberta and xlm-roberta single-label over the 77 Banking77 intents;
# bert-multilabel a sigmoid (multi-label) BERT over 6 labels; bert-slow a BERT whose folder has only the slow
# tokenizer's files (vocab.txt + tokenizer_config.json), no tokenizer.json; bert-4x256 a wider BERT (4 layers, 256
# wide, 128 positions) for the benchmark (`make encoder-artifact`), whose cost is an encoder's, not a toy's.
KINDS = ("bert", "distilbert", "roberta", "xlm-roberta", "bert-multilabel", "bert-slow", "bert-4x256")
MULTI_LABELS = ("card", "transfer", "top_up", "cash", "payment", "other")


def banking77() -> tuple[list[str], list[str]]:
    """The Banking77 training sentences and the 77 intents, sorted."""
    with TRAIN_CSV.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [row["text"] for row in rows], sorted({row["category"] for row in rows})


@functools.cache
def _wordpiece() -> str:
    """A lower-casing WordPiece tokenizer as bert-base-uncased has it (normalizer, [CLS] x [SEP]), as JSON."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)  # strip_accents None, as bert-base-uncased
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(banking77()[0], trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE,
                                                                           special_tokens=specials))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tokenizer.to_str()


@functools.cache
def _byte_level_bpe() -> str:
    """A byte-level BPE tokenizer as roberta-base has it (<s> x </s>, ids 0-4 special), as JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer.train_from_iterator(banking77()[0], trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                            add_prefix_space=False)
    return tokenizer.to_str()


def _labels(kind: str) -> list[str]:
    return list(MULTI_LABELS) if kind == "bert-multilabel" else banking77()[1]


def build(kind: str, folder: Path, seed: int = 0) -> Path:
    """Write the HF folder of ``kind`` (one of ``KINDS``) to ``folder`` and return it."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # built here, never fetched
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    import transformers
    from tokenizers import Tokenizer

    transformers.utils.logging.disable_progress_bar()
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    labels = _labels(kind)
    shape = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
             "label2id": {label: i for i, label in enumerate(labels)}, "vocab_size": VOCAB_SIZE}
    if kind == "bert-multilabel":
        shape["problem_type"] = "multi_label_classification"
    narrow = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
              "initializer_range": INIT}
    if kind == "bert-4x256":
        narrow = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
                  "initializer_range": 0.02}
    if kind.startswith("bert"):
        config = transformers.BertConfig(**shape, **narrow, max_position_embeddings=MAX_POSITIONS, pad_token_id=0)
        model_class, tokenizer_class, spec = (transformers.BertForSequenceClassification,
                                              transformers.BertTokenizerFast, _wordpiece())
    elif kind == "distilbert":
        config = transformers.DistilBertConfig(**shape, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                               initializer_range=INIT,
                                               max_position_embeddings=MAX_POSITIONS, pad_token_id=0)
        model_class, tokenizer_class, spec = (transformers.DistilBertForSequenceClassification,
                                              transformers.DistilBertTokenizerFast, _wordpiece())
    else:  # roberta and xlm-roberta: positions start after the padding id, so 128 positions hold 126 tokens
        family = transformers.RobertaConfig if kind == "roberta" else transformers.XLMRobertaConfig
        config = family(**shape, **narrow, max_position_embeddings=MAX_POSITIONS, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, type_vocab_size=1)
        model_class = (transformers.RobertaForSequenceClassification if kind == "roberta"
                       else transformers.XLMRobertaForSequenceClassification)
        tokenizer_class, spec = transformers.RobertaTokenizerFast, _byte_level_bpe()
    torch.manual_seed(seed)
    model = model_class(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    backend = Tokenizer.from_str(spec)
    if tokenizer_class is transformers.RobertaTokenizerFast:
        specials = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                    "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}
    else:
        specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                    "mask_token": "[MASK]"}
    tokenizer = tokenizer_class(tokenizer_object=backend, model_max_length=MAX_POSITIONS, **specials)
    if kind == "bert-slow":  # what an old checkpoint ships: the WordPiece vocabulary, one token a line, by id
        vocab = backend.get_vocab()
        (folder / "vocab.txt").write_text("".join(f"{token}\n" for token in sorted(vocab, key=vocab.get)),
                                          encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": MAX_POSITIONS}
            | specials, indent=2), encoding="utf-8")
    else:
        tokenizer.save_pretrained(folder)
    return folder


def transformers_probabilities(folder: Path, texts: list[str], max_length: int, sigmoid: bool):
    """The reference: transformers' tokenizer and model (eval mode, torch), softmax or sigmoid of the logits."""
    import numpy as np
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True).eval()
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), 50):
            batch = tokenizer.pad({key: value[start:start + 50] for key, value in encoded.items()},
                                  return_tensors="pt")
            logits = model(**batch).logits
            rows.append((torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1)).numpy())
    return encoded["input_ids"], np.concatenate(rows)



def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(f"usage: python -m tests.hf_models OUT_DIR [{' | '.join(KINDS)} ...]", file=sys.stderr)
        return 2
    out, kinds = Path(argv[0]), argv[1:] or list(KINDS)
    for kind in kinds:
        print(build(kind, out / kind))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
