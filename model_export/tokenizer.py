"""Fit a WordPiece tokenizer on the training texts; the service loads the same ``tokenizer.json``."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD = "[PAD]"
UNK = "[UNK]"


def fit_tokenizer(texts: list[str], vocab_size: int, min_frequency: int = 1) -> Tokenizer:
    """Lower-cased, accent-stripped WordPiece; no special tokens added, no truncation or padding saved."""
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, UNK], show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text, cut to ``max_length``; a text with no tokens becomes one unknown token."""
    unk_id = tokenizer.token_to_id(UNK)
    return [encoding.ids[:max_length] or [unk_id] for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]
