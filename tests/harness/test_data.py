"""Tests for experiments/data.py: CSV loading, escapes, splits, errors, hub fallback,
tokenization cache and the padding collator. Small CSVs written to tmp_path."""

import csv
import time
from pathlib import Path

import datasets
import pytest
import torch

from distrinews.errors import ModelLoadError
from experiments.data import DataError, load_ag_news, make_collator, tokenize
from experiments.model import LABELS, build_tokenizer


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)


def make_dir(tmp_path, n_per_class=10, n_test=8):
    """train.csv: 4 * n_per_class rows, classes cycling 1..4; test.csv: n_test rows."""
    train = [[str(i % 4 + 1), f"Title {i}", f"Description {i}"] for i in range(4 * n_per_class)]
    train[0] = ["3", "Wall St. Bears", r"Reuters - Short-sellers, Wall Street's dwindling\band of ultra-cynics."]
    train[1] = ["1", 'Quote "here"', r"Paid \$5 billion.\\Second paragraph\   indented."]
    test = [[str(i % 4 + 1), f"Test {i}", f"Test description {i}" + " more" * i] for i in range(n_test)]
    write_csv(tmp_path / "train.csv", train)
    write_csv(tmp_path / "test.csv", test)
    return tmp_path


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("tiny")


def test_texts_labels_and_escapes(tmp_path):
    dsd = load_ag_news(str(make_dir(tmp_path)), val_size=8)
    assert set(dsd) == {"train", "validation", "test"}
    assert dsd["train"].features["label"].names == list(LABELS)
    assert dsd["train"].column_names == ["text", "label"]
    # test keeps file order; label = class - 1; text = title + " " + description
    assert dsd["test"]["text"][:2] == ["Test 0 Test description 0", "Test 1 Test description 1 more"]
    assert dsd["test"]["label"] == [i % 4 for i in range(8)]
    rows = dict(
        zip(
            list(dsd["train"]["text"]) + list(dsd["validation"]["text"]),
            list(dsd["train"]["label"]) + list(dsd["validation"]["label"]),
        )
    )
    assert rows["Wall St. Bears Reuters - Short-sellers, Wall Street's dwindling band of ultra-cynics."] == 2
    assert rows['Quote "here" Paid $5 billion. Second paragraph indented.'] == 0
    assert not any("\\" in t for t in rows)


def test_split_sizes_and_seeded_determinism(tmp_path):
    d = str(make_dir(tmp_path))
    a, b = load_ag_news(d, val_size=0.2, seed=1), load_ag_news(d, val_size=0.2, seed=1)
    c = load_ag_news(d, val_size=0.2, seed=2)
    assert (len(a["train"]), len(a["validation"]), len(a["test"])) == (32, 8, 8)
    assert list(a["validation"]["text"]) == list(b["validation"]["text"])
    assert list(a["train"]["text"]) == list(b["train"]["text"])
    assert list(a["validation"]["text"]) != list(c["validation"]["text"])
    # disjoint, together all of train.csv, stratified (2 per class)
    assert not set(a["train"]["text"]) & set(a["validation"]["text"])
    assert len(set(a["train"]["text"]) | set(a["validation"]["text"])) == 40
    assert sorted(a["validation"]["label"]) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(load_ag_news(d, val_size=12)["validation"]) == 12


def test_caps(tmp_path):
    d = str(make_dir(tmp_path))
    full = load_ag_news(d, val_size=8)
    capped = load_ag_news(d, val_size=8, max_train_samples=5, max_eval_samples=3)
    assert [len(capped[s]) for s in ("train", "validation", "test")] == [5, 3, 3]
    for s in ("train", "validation", "test"):  # first N of the same split
        assert list(capped[s]["text"]) == list(full[s]["text"])[: len(capped[s])]
    assert len(load_ag_news(d, val_size=8, max_train_samples=10_000)["train"]) == 32


@pytest.mark.parametrize(
    "file, line, bad_row",
    [
        ("train.csv", 3, ["2", "only two fields"]),
        ("train.csv", 5, ["0", "t", "d"]),
        ("train.csv", 7, ["5", "t", "d"]),
        ("test.csv", 2, ["x", "t", "d"]),
        ("test.csv", 4, ["1", "  ", r"\\"]),  # empty after escape cleanup
    ],
)
def test_malformed_row(tmp_path, file, line, bad_row):
    make_dir(tmp_path)
    path = tmp_path / file
    rows = list(csv.reader(open(path, newline="", encoding="utf-8")))
    rows[line - 1] = bad_row
    write_csv(path, rows)
    with pytest.raises(DataError, match=rf"{file}, line {line}\b"):
        load_ag_news(str(tmp_path))


def test_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="nope.*--data-dir"):
        load_ag_news(str(tmp_path / "nope"))
    make_dir(tmp_path)
    (tmp_path / "test.csv").unlink()
    with pytest.raises(DataError, match="test.csv: file not found"):
        load_ag_news(str(tmp_path))
    make_dir(tmp_path)
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(DataError, match="train.csv: file is empty"):
        load_ag_news(str(tmp_path))


def test_hub_unreachable_names_data_dir(monkeypatch, tmp_path):
    # datasets / huggingface_hub read these at import time, so patch their copies too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # ignore a local copy
    t = time.time()
    with pytest.raises(DataError, match=r"unreachable.*--data-dir ../shared/ag_news"):
        load_ag_news()
    assert time.time() - t < 5


@pytest.mark.parametrize("load", ["data", "tokenizer", "model"])
def test_hub_out_of_reach_fails_in_seconds(monkeypatch, load):
    """No internet and no HF_HUB_OFFLINE: one connection attempt, then the message, not a minute of
    retries. A closed local port stands in for the unreachable hub (refused at once, like a failed DNS
    lookup); before the probe this took 28 s (data) and 50 s (tokenizer) here."""
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    from experiments.model import build_model, build_tokenizer

    t = time.time()
    if load == "data":
        with pytest.raises(DataError, match=r"unreachable.*127.0.0.1:9.*--data-dir .*--model minilm-l6"):
            load_ag_news()
    else:
        with pytest.raises(ModelLoadError, match=r"(?s)unreachable.*127.0.0.1:9.*--model minilm-l6"):
            (build_tokenizer if load == "tokenizer" else build_model)("distilbert")
    assert time.time() - t < 15


def test_hub_path_matches_csv(monkeypatch, tmp_path):
    """The hub's train/test hold the raw title + " " + description; cleaned like the CSV."""

    monkeypatch.setattr("experiments.data.unreachable_reason", lambda: None)  # as if online

    def fake_load_dataset(name):
        assert name == "fancyzhx/ag_news"
        feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABELS))})
        out = {}
        for split in ("train", "test"):
            rows = list(csv.reader(open(tmp_path / f"{split}.csv", newline="", encoding="utf-8")))
            out[split] = datasets.Dataset.from_dict(
                {"text": [f"{t} {d}" for _, t, d in rows], "label": [int(c) - 1 for c, _, _ in rows]}, features=feats
            )
        return datasets.DatasetDict(out)

    make_dir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub, local = load_ag_news(val_size=8), load_ag_news(str(tmp_path), val_size=8)
    for s in ("train", "validation", "test"):
        assert hub[s].features == local[s].features
        assert hub[s].to_dict() == local[s].to_dict()


def test_tokenize_columns_no_padding_truncation(tmp_path, tok):
    dsd = load_ag_news(str(make_dir(tmp_path)), val_size=8)
    td = tokenize(dsd, tok, max_length=16)
    for s in ("train", "validation", "test"):
        assert td[s].column_names == ["input_ids", "attention_mask", "labels"]
        assert len(td[s]) == len(dsd[s])
    row = td["test"][0]
    assert row["labels"].dtype == torch.int64 and row["labels"].item() == 0
    assert row["input_ids"][0] == tok.cls_token_id and row["input_ids"][-1] == tok.sep_token_id
    lens = [len(r["input_ids"]) for r in td["train"]]
    assert max(lens) == 16  # char-level: long texts hit max_length
    long = tokenize(dsd, tok, max_length=512)
    short = [len(r["input_ids"]) for r in long["test"]]
    assert len(set(short)) > 1 and max(short) < 512  # no padding: each row its own length
    assert all(r["attention_mask"].all() for r in long["test"])
    assert tok.pad_token_id not in torch.cat([r["input_ids"] for r in long["test"]]).tolist()


def test_tokenize_cache_reused(tmp_path, tok, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    make_dir(data)
    first = tokenize(load_ag_news(str(data), val_size=8), tok, max_length=32, cache_dir=str(cache))
    files = sorted(cache.glob("ag_news-*.arrow"))
    assert [f.name.split("-")[1] for f in files] == ["test", "train", "validation"]
    mtimes = [f.stat().st_mtime_ns for f in files]

    # Fresh data objects and tokenizer (as in another process, e.g. rank 1 after rank 0),
    # tokenizer calls forbidden: must load from the cache, since the key is content-based.
    def boom(*a, **k):
        raise AssertionError("tokenizer called: cache not reused")

    tok2 = build_tokenizer("tiny")
    monkeypatch.setattr(type(tok2), "__call__", boom)
    second = tokenize(load_ag_news(str(data), val_size=8), tok2, max_length=32, cache_dir=str(cache))
    monkeypatch.undo()
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert second["train"].cache_files[0]["filename"] == str(files[1])
    assert torch.equal(first["train"][0]["input_ids"], second["train"][0]["input_ids"])
    # Another max_length is another cache entry.
    tokenize(load_ag_news(str(data), val_size=8), tok, max_length=24, cache_dir=str(cache))
    assert len(list(cache.glob("ag_news-*.arrow"))) == 6


def test_collator_pads_to_longest(tmp_path, tok):
    td = tokenize(load_ag_news(str(make_dir(tmp_path)), val_size=8), tok, max_length=64)
    rows = [td["train"][i] for i in range(6)]
    longest = max(len(r["input_ids"]) for r in rows)
    batch = make_collator(tok)(rows)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (6, longest)
    assert batch["labels"].shape == (6,) and batch["labels"].dtype == torch.int64
    assert batch["attention_mask"].sum(1).tolist() == [len(r["input_ids"]) for r in rows]
    assert make_collator(tok, pad_to_multiple_of=8)(rows)["input_ids"].shape[1] % 8 == 0


def test_real_ag_news(ag_news):
    dsd = load_ag_news(str(ag_news))
    assert len(dsd["test"]) == 7600
    assert sorted(dsd["test"].to_pandas()["label"].value_counts().tolist()) == [1900] * 4
    assert len(dsd["train"]) + len(dsd["validation"]) in (10_429, 120_000)
    assert not any("\\" in t for t in dsd["test"]["text"])


def _data_fails_on(rank, world, out):
    from experiments.distributed import DistEnv, run_on_main_first

    env = DistEnv(rank=rank, world_size=world, backend="gloo")
    for failing_rank in (0, 1):

        def prepare(failing_rank=failing_rank):
            if rank == failing_rank:
                raise DataError("/data/train.csv: no such file")
            return "data"

        try:
            run_on_main_first(env, prepare)
        except DataError as e:  # the type survives: the exit code stays 2
            Path(out, f"fail{failing_rank}-rank{rank}").write_text(str(e))


def test_a_data_error_on_any_rank_stops_every_rank_with_its_message(tmp_path):
    # rank 0 is the one that prints: a failure on another machine's rank must reach it
    from support.spawn import run

    run(_data_fails_on, 2, tmp_path, str(tmp_path))
    for failing_rank in (0, 1):
        want = ("rank 1: " if failing_rank else "") + "/data/train.csv: no such file"
        got = [(tmp_path / f"fail{failing_rank}-rank{r}").read_text() for r in (0, 1)]
        assert got == [want, want], failing_rank
