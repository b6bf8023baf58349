"""Export a checkpoint to ONNX, float32 and int8, and check both against torch on the test split.

    python -m experiments.export runs/compare/scratch/checkpoint --data-dir ../shared/ag_news
    python -m experiments.export CHECKPOINT --out site/model --data-dir ../shared/ag_news   # elsewhere

Writes, under DIR (`--out`, default the checkpoint itself):

    DIR/onnx/model.onnx             the classifier in float32: inputs `input_ids` and `attention_mask`,
                                    int64 (batch, sequence), both axes dynamic; output `logits`,
                                    float32 (batch, labels)
    DIR/onnx/model_quantized.onnx   the same with int8 weights (dynamic quantization)
    DIR/onnx/parity.json            the checks below, as numbers
    DIR/config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json, training_args.json
                                    copied from the checkpoint when DIR is another folder

That is the layout transformers.js reads (`@huggingface/transformers`: `dtype: "q8"` loads
onnx/model_quantized.onnx, `"fp32"` onnx/model.onnx) and `python -m server --backend onnx` serves
(onnxruntime and the `tokenizers` package reading tokenizer.json: no torch, no transformers).

How: torch's own exporter (`torch.onnx.export`, the torch.export-based one that is torch's default
since 2.9; it needs `onnxscript`), then onnxruntime's `quantize_dynamic`: every MatMul's constant
weight stored as int8 (per tensor), its activations quantized to uint8 on the fly for each batch
("dynamic": no calibration data), as onnxruntime recommends for transformer models on CPUs
(onnxruntime.ai/docs/performance/model-optimizations/quantization.html). Hugging Face's own
exporter, optimum-onnx, wraps the same two steps, but its releases require transformers < 5, which
this project does not support.

Then the checks, on the test split's texts truncated as the server truncates them (the training
run's max_length, else 128 tokens), each model on the same token ids:
- float32 ONNX: the same prediction as torch's for every text (the largest difference of a class
  probability is printed: float32 rounding in another order of operations, about 1e-6);
- int8 ONNX: accuracy within one standard error of torch's, sqrt(p (1 - p) / n) (for p = 0.88 and
  the full 7,600 texts, 0.0037): quantization may cost accuracy, but less than the test split's own
  sampling noise.
Exit status (distrinews/errors.py): 0 when both checks hold, 1 when one fails (the files are
written all the same, for inspection), 2 for a checkpoint that cannot be exported (the message says
why and what to do) or a bad option, 3 if its weights cannot be loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from distrinews.errors import ModelLoadError, UsageError, guard

ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model_quantized.onnx"
INPUTS = ("input_ids", "attention_mask")  # int64 (batch, sequence), as tokenizers and transformers.js give them
OUTPUT = "logits"  # float32 (batch, labels)
# copied beside onnx/ when the export goes elsewhere: what transformers.js and the server read (those present)
SIDE_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "training_args.json",
)
HOW_TO_TRAIN = "A checkpoint is DIR/checkpoint of `python -m experiments.train ... --output-dir DIR`."
INSTALL = "pip install -e '.[onnx]' (or `make install`, which installs it)"


class ExportError(UsageError):
    """The checkpoint cannot be exported (not a checkpoint, no tokenizer.json, an architecture torch's
    exporter refuses) or the ONNX packages are missing; the message says what to do (exit 2)."""


@dataclass(frozen=True)
class Exported:
    """Where the export wrote its two models."""

    fp32: Path
    int8: Path


def _open_checkpoint(checkpoint: Path):
    """The checkpoint's model in eval mode, float32, on the CPU. Raises ExportError, ModelLoadError."""
    if not checkpoint.is_dir():
        raise ExportError(f"checkpoint directory {str(checkpoint)!r} does not exist. {HOW_TO_TRAIN}")
    if not (checkpoint / "config.json").is_file():
        raise ExportError(
            f"{str(checkpoint)!r} has no config.json: it is not a Hugging Face checkpoint. {HOW_TO_TRAIN}"
        )
    if not (checkpoint / "tokenizer.json").is_file():
        raise ExportError(
            f"{str(checkpoint)!r} has no tokenizer.json, the fast tokenizer's file that the ONNX server and "
            'transformers.js read. Write it with: python -c "from transformers import AutoTokenizer; '
            f"AutoTokenizer.from_pretrained('{checkpoint}', use_fast=True).save_pretrained('{checkpoint}')\""
        )
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" for each of the two loads
    try:
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype="float32")
    except Exception as e:  # OSError, ValueError, safetensors' own error for a truncated file...
        raise ModelLoadError(f"could not load the weights in {checkpoint}: {e}. {HOW_TO_TRAIN}") from None
    return model.eval()


@contextlib.contextmanager
def _quiet():
    """Hide the exporter's and the quantizer's progress notes and advice (torch.onnx logs a line per
    torchvision operator it skips, warns that dimension names are shared; onnxruntime's quantizer
    advises pre-processing); errors still raise."""
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)
    torch_onnx = logging.getLogger("torch.onnx")
    torch_level = torch_onnx.level
    torch_onnx.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
        torch_onnx.setLevel(torch_level)


def export(checkpoint: str | Path, out: str | Path | None = None) -> Exported:
    """Write `out`/onnx/model.onnx (float32) and model_quantized.onnx (int8 weights); copy the
    config and tokenizer files beside onnx/ when `out` is not the checkpoint.

    Args:
        checkpoint: a directory written by `experiments.checkpoint.save_checkpoint` (or any Hugging
            Face sequence-classification checkpoint with a tokenizer.json).
        out: where to write; default the checkpoint itself.

    Returns:
        The two models' paths.

    Raises:
        ExportError: not a checkpoint, no tokenizer.json, an architecture torch's exporter cannot
            export, or onnx/onnxruntime/onnxscript not installed.
        ModelLoadError: the weights cannot be loaded.
    """
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it; fail here, with the fix)
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise ExportError(f"the export needs onnx, onnxscript and onnxruntime ({e}): {INSTALL}") from None
    checkpoint = Path(checkpoint).expanduser()
    model = _open_checkpoint(checkpoint)
    out = checkpoint if out is None else Path(out).expanduser()
    (out / ONNX_DIR).mkdir(parents=True, exist_ok=True)
    fp32, int8 = out / ONNX_DIR / FP32_FILE, out / ONNX_DIR / INT8_FILE
    _export_fp32(model, fp32, checkpoint)
    with _quiet():  # it suggests a pre-processing step (shape inference) that dynamic quantization does not need
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    if out.resolve() != checkpoint.resolve():
        for name in SIDE_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, out / name)
    return Exported(fp32, int8)


def _export_fp32(model, fp32: Path, checkpoint: Path) -> None:
    """torch's ONNX exporter (dynamo) on `model`: one graph, inputs `input_ids` and `attention_mask`
    (int64, [batch, sequence], both dynamic), output `logits` (float32, [batch, labels]), in one file.

    Raises:
        ExportError: the exporter failed (its first line, with the checkpoint and model type).
    """
    import torch

    class Logits(torch.nn.Module):  # the model's output object -> its one tensor, named `logits` in the graph
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    positions = getattr(model.config, "max_position_embeddings", 512)
    batch, sequence = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length", max=positions)
    # an example of 2 texts x 8 tokens, the second padded: sizes other than 0 and 1, so that
    # torch.export does not specialize the graph to them; ones for the mask's real tokens
    ids = torch.full((2, 8), int(model.config.pad_token_id or 0), dtype=torch.long)
    ids[:, 0] = 101 % model.config.vocab_size
    mask = torch.ones((2, 8), dtype=torch.long)
    mask[1, 5:] = 0
    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(
                Logits(model),
                (),
                kwargs={"input_ids": ids, "attention_mask": mask},
                input_names=list(INPUTS),
                output_names=[OUTPUT],
                dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUTS},
                dynamo=True,
                external_data=False,  # one file, as transformers.js and the server load it (models < 2 GB)
                verbose=False,
            )
        program.save(str(fp32), external_data=False)
    except Exception as e:  # torch's exporter raises many types; say which model failed and why, in a line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"torch's ONNX exporter could not export {checkpoint} (model_type "
            f"{model.config.model_type!r}, {type(model).__name__}): {first}"
        ) from None


# ---- the checks ----------------------------------------------------------------------------
def _batches(ids: list[list[int]], pad_id: int, size: int):
    """(indices, input_ids, attention_mask) per batch of `size` texts, longest first (less padding);
    int64 numpy arrays (texts, longest in the batch)."""
    import numpy as np

    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        longest = max(len(ids[i]) for i in chunk)
        input_ids = np.full((len(chunk), longest), pad_id, dtype=np.int64)
        mask = np.zeros((len(chunk), longest), dtype=np.int64)
        for row, i in enumerate(chunk):
            input_ids[row, : len(ids[i])] = ids[i]
            mask[row, : len(ids[i])] = 1
        yield chunk, input_ids, mask


def _softmax(logits):
    """Class probabilities from logits (texts, labels), in float64."""
    import numpy as np

    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def probabilities(run, ids: list[list[int]], pad_id: int, batch_size: int = 64):
    """float64 (texts, labels): `run(input_ids, attention_mask) -> logits` over `ids` in batches."""
    import numpy as np

    out = None
    for chunk, input_ids, mask in _batches(ids, pad_id, batch_size):
        p = _softmax(np.asarray(run(input_ids, mask)))
        out = np.zeros((len(ids), p.shape[1])) if out is None else out
        out[chunk] = p
    return out


def onnx_runner(path: Path):
    """`run(input_ids, attention_mask) -> logits` of an ONNX model under onnxruntime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda input_ids, mask: session.run([OUTPUT], {INPUTS[0]: input_ids, INPUTS[1]: mask})[0]


def check(checkpoint: Path, exported: Exported, texts: list[str], labels: list[int], max_length: int) -> dict:
    """Compare torch, float32 ONNX and int8 ONNX on `texts` (truncated to `max_length` tokens).

    Returns a dict: n, max_length, accuracy of each, fp32_equal_predictions (count),
    fp32_max_prob_diff, int8_accuracy_diff, standard_error (of torch's accuracy), fp32_ok, int8_ok.
    """
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model = _open_checkpoint(checkpoint)

    def run_torch(input_ids, mask):
        with torch.inference_mode():
            return model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)).logits.numpy()

    truth = np.asarray(labels)
    p_torch = probabilities(run_torch, ids, pad)
    p_fp32 = probabilities(onnx_runner(exported.fp32), ids, pad)
    p_int8 = probabilities(onnx_runner(exported.int8), ids, pad)
    acc = {
        name: float((p.argmax(1) == truth).mean())
        for name, p in (("torch", p_torch), ("fp32", p_fp32), ("int8", p_int8))
    }
    n = len(texts)
    se = math.sqrt(acc["torch"] * (1 - acc["torch"]) / n)
    same = int((p_fp32.argmax(1) == p_torch.argmax(1)).sum())
    return {
        "n": n,
        "max_length": max_length,
        "accuracy_torch": acc["torch"],
        "accuracy_onnx_fp32": acc["fp32"],
        "accuracy_onnx_int8": acc["int8"],
        "fp32_equal_predictions": same,
        "fp32_max_prob_diff": float(np.abs(p_fp32 - p_torch).max()),
        "int8_equal_predictions": int((p_int8.argmax(1) == p_torch.argmax(1)).sum()),
        "int8_max_prob_diff": float(np.abs(p_int8 - p_torch).max()),
        "int8_accuracy_diff": acc["int8"] - acc["torch"],
        "standard_error": se,
        "fp32_ok": same == n,
        "int8_ok": abs(acc["int8"] - acc["torch"]) <= se,
    }


# What a failed int8 check usually means: quantization moves each class probability a little (int8_max_prob_diff),
# which changes a prediction only where two classes are close, and a briefly trained model is close on many texts.
INT8_HINT = (
    "hint: a model trained briefly (a smoke run) has many texts near a tie between two "
    "classes, where int8's small changes flip predictions: train longer (the Kaggle notebook's run, "
    "docs/kaggle.md) and export again"
)


def report(r: dict) -> str:
    """The checks as the command prints them."""
    n = r["n"]
    return "\n".join(
        [
            f"test split: {n} texts, truncated to {r['max_length']} tokens",
            f"torch fp32: accuracy {r['accuracy_torch']:.4f}",
            f"onnx fp32:  accuracy {r['accuracy_onnx_fp32']:.4f}; the same prediction as torch for "
            f"{r['fp32_equal_predictions']}/{n} texts; largest probability difference {r['fp32_max_prob_diff']:.2e}"
            f"  [{'ok' if r['fp32_ok'] else 'FAILED: predictions differ'}]",
            f"onnx int8:  accuracy {r['accuracy_onnx_int8']:.4f} ({r['int8_accuracy_diff']:+.4f} against torch; one "
            f"standard error of torch's accuracy, sqrt(p(1-p)/n) = {r['standard_error']:.4f}); the same prediction as "
            f"torch for {r['int8_equal_predictions']}/{n} texts; largest probability difference "
            f"{r['int8_max_prob_diff']:.2e}  [{'ok' if r['int8_ok'] else 'FAILED: beyond one standard error'}]",
        ]
        + ([] if r["int8_ok"] else [INT8_HINT])
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.export",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (<experiments.train --output-dir>/checkpoint)")
    p.add_argument(
        "--out", type=Path, default=None, help="where to write onnx/ and the tokenizer files (default: CHECKPOINT)"
    )
    p.add_argument("--data-dir", default=None, help="directory with train.csv/test.csv (ag_news_csv); default: the hub")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per text in the checks (default: the training run's, else 128, as the server)",
    )
    p.add_argument(
        "--max-eval-samples", type=int, default=None, help="check on the first N test texts only (default: all 7,600)"
    )
    p.add_argument(
        "--no-check", dest="check", action="store_false", help="export only, no comparison on the test split"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m experiments.export`: the exit status of errors.py's policy (0 ok, 1 a check failed, 2, 3)."""
    args = build_parser().parse_args(argv)
    return guard(lambda: _export_and_check(args))


def _export_and_check(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    exported = export(args.checkpoint, args.out)
    mb = lambda f: f.stat().st_size / 1e6
    print(
        f"wrote {exported.fp32} ({mb(exported.fp32):.1f} MB, float32) and {exported.int8.name} "
        f"({mb(exported.int8):.1f} MB, int8 weights) in {time.perf_counter() - t0:.0f} s"
    )
    if not args.check:
        return 0
    from server.checkpoint import Checkpoint  # the server's truncation rule: parity where it serves

    from .data import load_ag_news

    test = load_ag_news(args.data_dir, max_eval_samples=args.max_eval_samples)["test"]
    max_length = Checkpoint.open(args.checkpoint).max_length(args.max_length)
    r = check(args.checkpoint, exported, list(test["text"]), list(test["label"]), max_length)
    (exported.fp32.parent / "parity.json").write_text(json.dumps(r, indent=2) + "\n")
    print(report(r))
    return 0 if r["fp32_ok"] and r["int8_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
