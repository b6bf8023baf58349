"""The ring part in quick mode: our ring all-reduce against gloo's, its halves, its settings, the machine's limits."""

from __future__ import annotations

import json

from experiments.bench.ring import SETTINGS, run


def test_quick_ring_part_times_every_operation_and_derives_the_limits(tmp_path):
    result = run(tmp_path, quick=True)
    (table,) = result["tables"].values()
    ms = table["ms"]
    assert len([k for k in ms if k.startswith("ring all-reduce")]) == len(SETTINGS)
    assert {"gloo all-reduce", "gloo all-gather", "ring all-gather", "copy_ of S"} <= set(ms)
    assert all(v > 0 for v in ms.values())
    # 2 ranks: the ideal ring is 2 steps of the one-message transport; a message costs something
    assert table["ideal_ring_ms"] == 2 * ms["one ring step, one message"] and table["per_message_ms"] > 0
    assert json.loads((tmp_path / "ring.json").read_text())["tables"]["2"]["ms"] == ms
    assert "| gloo all-reduce |" in (tmp_path / "ring.md").read_text()
