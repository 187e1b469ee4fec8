"""The classifier: Embedding -> BiLSTM that never reads padding -> masked max+mean pooling -> Linear -> / T -> softmax.

Why it is batch-invariant: the forward LSTM is causal, so its outputs at the real steps of a
right-padded sentence never see the padding after them. The backward direction is a second
forward LSTM run over each sentence reversed *within its own length* (padding stays at the end),
so it too only reads real tokens before the steps that are pooled. Pooling then looks only at
steps ``t < length``. ONNX's ``LSTM`` op has no per-sentence state reset without
``sequence_lens``, and this construction needs none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    num_classes: int
    pad_id: int
    embedding_dim: int = 256
    hidden_size: int = 256
    bidirectional: bool = True
    dropout: float = 0.3
    embedding_dropout: float = 0.1


def reverse_within_length(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first ``length`` entries in place order; padding stays where it is."""
    steps = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)  # [1, seq]
    last = lengths.unsqueeze(1) - 1  # [batch, 1]
    index = torch.where(steps <= last, last - steps, steps)  # [batch, seq]
    if ids.dim() == 3:
        index = index.unsqueeze(-1).expand_as(ids)
    return torch.gather(ids, 1, index)


class SentenceClassifier(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        self.embedding = nn.Embedding(shape.vocab_size, shape.embedding_dim, padding_idx=shape.pad_id)
        self.embedding_dropout = nn.Dropout(shape.embedding_dropout)
        self.forward_lstm = nn.LSTM(shape.embedding_dim, shape.hidden_size, batch_first=True)
        self.backward_lstm = (
            nn.LSTM(shape.embedding_dim, shape.hidden_size, batch_first=True) if shape.bidirectional else None
        )
        directions = 2 if shape.bidirectional else 1
        self.dropout = nn.Dropout(shape.dropout)
        self.head = nn.Linear(2 * directions * shape.hidden_size, shape.num_classes)
        # Temperature scaling (model_export/calibration.py): fitted on validation after training, 1 until then.
        self.register_buffer("temperature", torch.tensor(1.0))

    def logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = lengths.clamp(min=1, max=input_ids.shape[1])
        x = self.embedding_dropout(self.embedding(input_ids))  # [batch, seq, emb]
        states, _ = self.forward_lstm(x)  # zero initial state for every sentence
        if self.backward_lstm is not None:
            reversed_states, _ = self.backward_lstm(reverse_within_length(x, lengths))
            states = torch.cat([states, reverse_within_length(reversed_states, lengths)], dim=-1)
        valid = (torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0) < lengths.unsqueeze(1))
        valid = valid.unsqueeze(-1)  # [batch, seq, 1]
        pooled_max = states.masked_fill(~valid, -1e4).amax(dim=1)
        pooled_mean = (states * valid).sum(dim=1) / lengths.unsqueeze(1).to(states.dtype)
        return self.head(self.dropout(torch.cat([pooled_max, pooled_mean], dim=-1)))

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class probabilities, calibrated by the temperature: the exported graph's only output."""
        return torch.softmax(self.logits(input_ids, lengths) / self.temperature, dim=-1)
