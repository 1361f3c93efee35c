"""Task head on the first token: dropout -> dense -> tanh -> dropout -> out (BERT pooler + classifier shape).

The dense layer starts from the encoder's pretrained pooler when it has one, and always trains (in every
method, including prefix-only and LoRA-only, unlike parts of the original code).
"""
from __future__ import annotations

import torch
from torch import nn


class ClassificationHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1, pooler: nn.Module | None = None) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 means regression), got {num_labels}")
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)
        dense = getattr(pooler, "dense", None)
        if isinstance(dense, nn.Linear) and dense.weight.shape == self.dense.weight.shape:
            with torch.no_grad():
                self.dense.weight.copy_(dense.weight)
                self.dense.bias.copy_(dense.bias)
        else:
            nn.init.normal_(self.dense.weight, std=0.02)
            nn.init.zeros_(self.dense.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.dropout(hidden_states[:, 0])
        x = torch.tanh(self.dense(x))
        return self.out(self.dropout(x))
