"""The model behind the server: token ids in, one prediction per text out.

A `Predictor` is any callable `predictor(ids) -> list[Prediction]`; the serving state (state.py)
runs it on the batcher's thread. `load_model_predictor` is the real one (the checkpoint's weights);
tests pass a fake instead (`create_app(..., load_predictor=...)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

import torch

from .checkpoint import Checkpoint


class Prediction(TypedDict):
    """One text's answer, as POST /predict returns it."""

    label: str  # the most probable class
    label_id: int  # its id (config.json's id2label)
    confidence: float  # its probability, 0..1
    probabilities: dict[str, float]  # every class's probability, summing to 1


Predictor = Callable[[list[list[int]]], list[Prediction]]
"""Classify texts given as token ids (one unpadded list of ints per text); one Prediction per text, in order."""

PredictorLoader = Callable[[Checkpoint, int], Predictor]
"""`load(checkpoint, pad_token_id) -> Predictor`, run on a worker thread at startup."""


class ModelPredictor:
    """A sequence-classification model on the CPU: pads the texts into one batch and runs one forward pass.

    Args:
        model: a Hugging Face sequence-classification model in eval mode.
        pad_id: the tokenizer's padding token id.
        labels: class names by class id.
    """

    def __init__(self, model: torch.nn.Module, pad_id: int, labels: tuple[str, ...]):
        self.model, self.pad_id, self.labels = model, pad_id, list(labels)

    def __call__(self, ids: list[list[int]]) -> list[Prediction]:
        longest = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), longest), self.pad_id, dtype=torch.long)  # (texts, longest) int64
        mask = torch.zeros((len(ids), longest), dtype=torch.long)  # 1 on real tokens, 0 on padding
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        with torch.inference_mode():
            probs = self.model(input_ids=input_ids, attention_mask=mask).logits.float().softmax(dim=-1)
        best = probs.argmax(dim=-1).tolist()
        return [
            {"label": self.labels[i], "label_id": i, "confidence": p[i], "probabilities": dict(zip(self.labels, p))}
            for i, p in zip(best, probs.tolist())
        ]


def load_model_predictor(checkpoint: Checkpoint, pad_id: int) -> ModelPredictor:
    """The checkpoint's weights as a ModelPredictor. Raises whatever transformers raises for broken weights."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint.path).eval()
    return ModelPredictor(model, pad_id, checkpoint.labels)
