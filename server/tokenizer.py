"""Texts -> token ids, with the `tokenizers` library reading the checkpoint's tokenizer.json directly.

transformers' fast tokenizers are this same Rust tokenizer, loaded from the same tokenizer.json;
reading it with `tokenizers` alone keeps transformers (and through it torch) out of the server's
ONNX route, and gives both backends the same ids (tests/server/test_server_onnx.py compares them
with transformers' on the test texts). Truncation is set once at load: `max_length` tokens per
text, special tokens ([CLS], [SEP]) included, as `tokenizer(texts, truncation=True, max_length=N)`.
"""

from __future__ import annotations

import json
from pathlib import Path


class TextTokenizer:
    """`tokenizer(texts) -> token ids`: one unpadded list of ints per text, at most `max_length` each.

    Args:
        path: a checkpoint directory with tokenizer.json (and tokenizer_config.json, for the pad token).
        max_length: tokens kept per text (>= 2: room for [CLS] and [SEP]).

    Attributes:
        pad_id: the padding token's id (tokenizer_config.json's pad_token; else config.json's
            pad_token_id; else 0). Padded positions are masked, so its value only has to be a valid id.

    Raises:
        FileNotFoundError: no tokenizer.json in `path`.
        Exception: whatever `tokenizers` raises for a malformed tokenizer.json.
    """

    def __init__(self, path: Path, max_length: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_padding()  # the batcher pads a whole batch at once (predictor.py)
        self.tokenizer.enable_truncation(max_length)
        self.max_length = max_length
        self.pad_id = self._pad_id(path)

    def _pad_id(self, path: Path) -> int:
        for name, key in (("tokenizer_config.json", "pad_token"), ("config.json", "pad_token_id")):
            try:
                value = json.loads((path / name).read_text()).get(key)
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(value, dict):  # an AddedToken written out: {"content": "[PAD]", ...}
                value = value.get("content")
            pad = self.tokenizer.token_to_id(value) if isinstance(value, str) else value
            if isinstance(pad, int):
                return pad
        return 0

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
