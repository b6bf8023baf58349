"""The model behind the server: token ids in, one prediction per text out, on one of two backends.

A `Predictor` is any callable `predictor(ids) -> list[Prediction]`; the serving state (state.py)
runs it on the batcher's thread. Two real ones, chosen by `--backend` (`BACKENDS`, one entry each):

    onnx    `OnnxPredictor`: onnxruntime running the checkpoint's exported model
            (onnx/model_quantized.onnx, int8, by default; `python -m experiments.export` writes it).
            Imports neither torch nor transformers: the torch-free image (deploy/Dockerfile.onnx).
    torch   `ModelPredictor`: the checkpoint's safetensors weights, float32, in torch.

Tests pass a fake instead (`create_app(..., load_predictor=...)`). Both real ones pad a batch the
same way (`pad`) and turn logits into answers the same way (`predictions`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from .checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch


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


def pad(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 (texts, longest): the texts padded at the end with `pad_id`,
    the mask 1 on real tokens and 0 on padding."""
    longest = max(len(x) for x in ids)
    input_ids = np.full((len(ids), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), longest), dtype=np.int64)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return input_ids, mask


def predictions(logits: np.ndarray, labels: tuple[str, ...]) -> list[Prediction]:
    """One Prediction per row of `logits` (texts, classes), any float dtype: softmax in float64."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    probs = (z / z.sum(axis=1, keepdims=True)).tolist()
    best = [max(range(len(p)), key=p.__getitem__) for p in probs]
    return [
        {"label": labels[i], "label_id": i, "confidence": p[i], "probabilities": dict(zip(labels, p))}
        for i, p in zip(best, probs)
    ]


class ModelPredictor:
    """A sequence-classification model in torch on the CPU: one forward pass per batch.

    Args:
        model: a Hugging Face sequence-classification model in eval mode.
        pad_id: the tokenizer's padding token id.
        labels: class names by class id.
    """

    def __init__(self, model: torch.nn.Module, pad_id: int, labels: tuple[str, ...]):
        self.model, self.pad_id, self.labels = model, pad_id, tuple(labels)

    def __call__(self, ids: list[list[int]]) -> list[Prediction]:
        import torch

        input_ids, mask = (torch.from_numpy(a) for a in pad(ids, self.pad_id))
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
        return predictions(logits.numpy(), self.labels)


def load_model_predictor(checkpoint: Checkpoint, pad_id: int) -> ModelPredictor:
    """The checkpoint's weights as a ModelPredictor. Raises whatever transformers raises for broken weights."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint.path).eval()
    return ModelPredictor(model, pad_id, checkpoint.labels)


class OnnxPredictor:
    """An exported model (`python -m experiments.export`) in onnxruntime on the CPU: one run per batch.

    Args:
        path: the .onnx file; inputs `input_ids`, `attention_mask` (int64, texts x tokens), output
            `logits` (float32, texts x classes).
        pad_id: the tokenizer's padding token id.
        labels: class names by class id.
        threads: onnxruntime's intra-op threads; None: its default (one per physical core, which in a
            container limited to a fraction of a CPU is too many: pass 1 there, docs/deploy.md).
            Idle threads sleep instead of spinning: on a shared or throttled CPU a spinning thread
            burns the time the others need.
    """

    def __init__(self, path, pad_id: int, labels: tuple[str, ...], threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.pad_id, self.labels = pad_id, tuple(labels)

    def __call__(self, ids: list[list[int]]) -> list[Prediction]:
        input_ids, mask = pad(ids, self.pad_id)
        (logits,) = self.session.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})
        return predictions(logits, self.labels)


@dataclass(frozen=True)
class Backend:
    """One way to run the model: its loader and the packages whose versions /info reports.

    `loader(model_file, threads)` returns the PredictorLoader for those settings; `model_file` is
    the ONNX file relative to the checkpoint (the torch backend ignores it).
    """

    name: str
    packages: tuple[str, ...]
    loader: Callable[[str, int | None], PredictorLoader]


def _torch_loader(model_file: str, threads: int | None) -> PredictorLoader:
    def load(checkpoint: Checkpoint, pad_id: int) -> ModelPredictor:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        return load_model_predictor(checkpoint, pad_id)

    return load


def _onnx_loader(model_file: str, threads: int | None) -> PredictorLoader:
    return lambda checkpoint, pad_id: OnnxPredictor(checkpoint.path / model_file, pad_id, checkpoint.labels, threads)


BACKENDS = {
    "onnx": Backend("onnx", ("onnxruntime", "tokenizers", "numpy"), _onnx_loader),
    "torch": Backend("torch", ("torch", "transformers", "tokenizers"), _torch_loader),
}
"""The backends by `--backend` name."""
