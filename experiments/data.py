"""AG News: load, split, tokenize, batch.

AG News (Zhang, Zhao & LeCun, "Character-level Convolutional Networks for Text
Classification", NIPS 2015) is 120,000 train and 7,600 test news articles in 4
balanced classes: World, Sports, Business, Sci/Tech.

Two sources, same result (columns `text`, `label` = ClassLabel over `LABELS`):
- the Hugging Face hub (`fancyzhx/ag_news`), the default when you have internet;
- `--data-dir DIR`, a directory with `train.csv` and `test.csv` in the original
  `ag_news_csv` form (rows `"class","title","description"`, no header, class 1..4),
  e.g. `../shared/ag_news`. No network needed.

The validation split is carved from train with a fixed seed, so every rank and
every run sees the same one; the test split is only for final reporting.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re

import datasets
from datasets import ClassLabel, DatasetDict, Features, List, Value
from transformers import DataCollatorWithPadding

from distrinews.errors import DataError  # defined with the other error types; importable from here as before

from .hub import unreachable_reason
from .model import LABELS

HUB_ID = "fancyzhx/ag_news"
FEATURES = Features({"text": Value("string"), "label": ClassLabel(names=list(LABELS))})
TOKENIZED = Features(
    {
        "input_ids": List(Value("int32")),  # vocabularies are far below 2**31
        "attention_mask": List(Value("int8")),
        "labels": Value("int64"),
    }
)  # what cross_entropy wants
CACHE_VERSION = "1"  # bump when `tokenize` changes what it writes, to invalidate old caches
CSV_FORM = 'the original ag_news_csv form: rows "class","title","description", no header, class 1..4 = ' + ", ".join(
    LABELS
)
OFFLINE_HINT = "--data-dir ../shared/ag_news (a directory with train.csv and test.csv in the original ag_news_csv form)"


def clean_text(text: str) -> str:
    r"""Undo the original's escapes: `\$` is a dollar sign, any other run of backslashes
    (`\`, `\\`) stands for a line break; then collapse whitespace."""
    text = re.sub(r"\\(?=\$)", "", text)
    text = re.sub(r"\\+", " ", text)
    return " ".join(text.split())


def _read_csv(path: str) -> datasets.Dataset:
    """One ag_news_csv file -> Dataset(text, label). Raises DataError naming file and line."""
    if not os.path.isfile(path):
        raise DataError(
            f"{path}: file not found. The data directory must contain train.csv and test.csv in {CSV_FORM}."
        )
    texts, labels = [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                where = f"{path}, line {reader.line_num}"  # AG News rows never span lines
                if len(row) != 3:
                    raise DataError(
                        f"{where}: expected 3 fields, got {len(row)}. "
                        f"Every row must be in {CSV_FORM}; fix or delete this row."
                    )
                cls, title, description = row
                try:
                    label = int(cls) - 1
                except ValueError:
                    label = -1
                if not 0 <= label < len(LABELS):
                    raise DataError(
                        f"{where}: class {cls!r} is not an integer in 1..4 "
                        f"(1 = {LABELS[0]}, ..., 4 = {LABELS[-1]}; a header line is not "
                        "allowed). Fix the first field of this row."
                    )
                text = clean_text(title + " " + description)
                if not text:
                    raise DataError(f"{where}: title and description are both empty. Fill them in or delete this row.")
                texts.append(text)
                labels.append(label)
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}, after line {reader.line_num}: not UTF-8 text ({e}). Re-save the file as UTF-8."
            ) from None
        except csv.Error as e:
            raise DataError(
                f"{path}, line {reader.line_num}: malformed CSV ({e}). Rows must be in {CSV_FORM}."
            ) from None
    if not texts:
        raise DataError(f"{path}: file is empty. It must hold rows in {CSV_FORM}.")
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=FEATURES)


def _load_hub() -> DatasetDict:
    reason = unreachable_reason()  # seconds, instead of the library's minute of retries
    try:
        if reason is not None:
            raise ConnectionError(reason)
        dsd = datasets.load_dataset(HUB_ID)
    except Exception as e:  # offline, DNS failure, hub outage: all end here
        raise DataError(
            f"Could not load AG News from the Hugging Face hub ({HUB_ID}): the hub was "
            f"unreachable ({type(e).__name__}: {e}). Without internet pass "
            f"{OFFLINE_HINT}, and --model minilm-l6 (offline weights) or --model tiny."
        ) from None
    # Same text cleanup as the CSV path, so both sources give identical examples.
    dsd = DatasetDict(train=dsd["train"], test=dsd["test"])
    return dsd.map(
        lambda b: {"text": [clean_text(t) for t in b["text"]]}, batched=True, features=FEATURES, desc="clean"
    )


def _head(ds: datasets.Dataset, n: int | None) -> datasets.Dataset:
    return ds if n is None or n >= len(ds) else ds.select(range(n))


def load_ag_news(
    data_dir: str | None = None,
    *,
    val_size: float | int = 0.05,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> DatasetDict:
    """AG News as a DatasetDict with splits `train`, `validation`, `test`.

    Each example: `text` (str, title + " " + description, escapes cleaned) and
    `label` (int 0..3, ClassLabel with names `LABELS`).

    Args:
        data_dir: directory with train.csv and test.csv (ag_news_csv form); None = the hub.
        val_size: validation split carved from train, a fraction (float) or a count (int).
            Stratified by label and seeded: the same seed gives the same split on every
            rank and every run.
        seed: seed of that split.
        max_train_samples: keep the first N train examples (after the shuffling split).
        max_eval_samples: keep the first N validation and the first N test examples.

    Raises:
        DataError: the hub is unreachable (message names the `--data-dir` option); or the
            directory or a file is missing, a file is empty, or a row has not exactly 3
            fields, a class outside 1..4, or an empty text (message names file and line).
    """
    if data_dir is None:
        dsd = _load_hub()
    else:
        if not os.path.isdir(data_dir):
            raise DataError(
                f"{data_dir}: data directory not found. Pass --data-dir a directory "
                f"with train.csv and test.csv in {CSV_FORM} (e.g. ../shared/ag_news), "
                "or omit it to download from the hub."
            )
        dsd = DatasetDict({split: _read_csv(os.path.join(data_dir, f"{split}.csv")) for split in ("train", "test")})
    try:
        # keep_in_memory: the split is just an index array; no cache files for ranks to race on.
        split = dsd["train"].train_test_split(
            test_size=val_size, seed=seed, stratify_by_column="label", keep_in_memory=True
        )
    except ValueError as e:
        where = "the hub" if data_dir is None else os.path.join(data_dir, "train.csv")
        raise DataError(
            f"{where}: cannot carve a validation split of {val_size!r} from "
            f"{len(dsd['train'])} training rows ({e}). Use a smaller val_size "
            "or more data."
        ) from None
    return DatasetDict(
        train=_head(split["train"], max_train_samples),
        validation=_head(split["test"], max_eval_samples),
        test=_head(dsd["test"], max_eval_samples),
    )


def _content_hash(ds: datasets.Dataset) -> str:
    """sha256 of the texts and labels. Unlike `ds._fingerprint` (random when datasets cannot
    hash a transform), it is the same in every process that holds the same data."""
    h = hashlib.sha256()
    for batch in ds.with_format(None).select_columns(["text", "label"]).iter(batch_size=10_000):
        h.update(json.dumps([batch["text"], batch["label"]]).encode())
    return h.hexdigest()


def _tokenizer_hash(tokenizer) -> str:
    """sha256 of the fast tokenizer's full definition (vocab, normalizer, special tokens)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    # A call with truncation=True leaves these set on the backend; they are not identity.
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def tokenize(dsd: DatasetDict, tokenizer, max_length: int = 128, cache_dir: str | None = None) -> DatasetDict:
    """Tokenize every split; no padding here (the collator pads each batch).

    Returns a DatasetDict in torch format, one row per example with columns
    `input_ids` (int32, shape (L,), L <= max_length, [CLS] ... [SEP]),
    `attention_mask` (int8, shape (L,), all ones) and `labels` (int64 scalar).

    With `cache_dir`, each split is written to `cache_dir/ag_news-<split>-<key>.arrow`, the
    key hashing the split's content, the tokenizer and max_length; a later call with the
    same inputs, in this or any other process (e.g. rank 1 after rank 0), loads that file.

    Raises:
        TypeError: `tokenizer` is not a fast (Rust-backed) tokenizer.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenize needs a fast tokenizer (use_fast=True)")
    tok_hash = _tokenizer_hash(tokenizer)

    def encode(batch):  # a batch of rows as lists -> lists of variable-length token lists
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": batch["label"]}

    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    out = {}
    for split, ds in dsd.items():
        key = hashlib.sha256(f"{CACHE_VERSION}|{_content_hash(ds)}|{tok_hash}|{max_length}".encode()).hexdigest()[:16]
        path = None if cache_dir is None else os.path.join(cache_dir, f"ag_news-{split}-{key}.arrow")
        # new_fingerprint=key: datasets need not hash the tokenizer (slow, sometimes random).
        out[split] = ds.map(
            encode,
            batched=True,
            remove_columns=ds.column_names,
            features=TOKENIZED,
            cache_file_name=path,
            load_from_cache_file=True,
            new_fingerprint=key,
            desc=f"tokenize {split}",
        )
    out = DatasetDict(out)
    out.set_format("torch")
    return out


def make_collator(tokenizer, pad_to_multiple_of: int | None = None) -> DataCollatorWithPadding:
    """Pads a list of `tokenize` rows to the batch's longest sequence.

    Returns a callable: list of B rows -> dict of tensors `input_ids`, `attention_mask`
    (int64, shape (B, T), T = longest row, rounded up to `pad_to_multiple_of` if given)
    and `labels` (int64, shape (B,)).
    """
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
