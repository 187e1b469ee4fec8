"""Fit a tokenizer on the training texts; the service loads the same ``tokenizer.json`` (``contract.Encoder`` turns
texts into ids on both sides)."""

from __future__ import annotations

from collections import Counter

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

PAD = "[PAD]"
UNK = "[UNK]"


def fit_tokenizer(texts: list[str], vocab_size: int, min_frequency: int = 1) -> Tokenizer:
    """Lower-cased, accent-stripped WordPiece with a vocabulary chosen deterministically.

    The vocabulary is the two special tokens, every character seen (alone and as a ``##`` continuation, so an
    unseen word falls back to its characters rather than to ``[UNK]``), then whole words by descending
    frequency (ties by spelling) up to ``vocab_size``. Measured here, Hugging Face's WordPiece trainer chose a
    different 4k vocabulary on each call (frequency ties), which broke ``--seed`` reproducibility.
    No special tokens are added and no truncation or padding is saved.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({character for word in counts for character in word})
    vocabulary = [PAD, UNK, *characters, *(f"##{c}" for c in characters)]
    taken = set(vocabulary)
    words = sorted((w for w, n in counts.items() if n >= min_frequency and w not in taken), key=lambda w: (-counts[w], w))
    vocabulary += words[: max(0, vocab_size - len(vocabulary))]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocabulary)}, unk_token=UNK,
                                           max_input_chars_per_word=100))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer

