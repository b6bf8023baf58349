"""The link part in quick mode: on 2 emulated nodes at 1 Gbit/s (tiny model, 6 rounds), every
configuration and the compute-only step interleaved in one launch, ratios paired within it.

Builds its own namespaces through experiments/cluster/ (a few MB between them, removed after);
skipped without root or network namespaces, as tests/cluster/test_cluster.py. About 25 s on 2 cores.
"""

from __future__ import annotations

import json

import pytest
from support.namespaces import WHY_NO_NAMESPACES, needs_namespaces

from distrinews.errors import UsageError
from experiments.bench.link import COMPUTE_ONLY, CONFIGS, QUICK, run


def test_unknown_measure_is_a_usage_error(tmp_path):
    if WHY_NO_NAMESPACES is not None:
        pytest.skip(WHY_NO_NAMESPACES)
    with pytest.raises(UsageError, match="--measure 'speed'"):
        run(tmp_path, quick=True, measure="speed")


@pytest.mark.slow
@needs_namespaces
def test_quick_link_splits_every_configuration_into_compute_and_exposed_communication(tmp_path):
    result = run(tmp_path, quick=True)
    rows = result["rates"]["1gbit"]
    assert set(rows) == {*CONFIGS, COMPUTE_ONLY}
    for k, r in rows.items():
        assert len(r["step_ms"]) == QUICK["steps"] and r["median_ms"] > 0, k
    assert rows[COMPUTE_ONLY]["vs_compute_only"] == 1.0 and rows[COMPUTE_ONLY]["mib_sent_per_rank"] == 0
    assert rows["native"]["vs_native"] == 1.0
    # the hooks send every gradient in 16 bits: half of the dense fp32 bytes, torch's and ours alike
    for impl, dense in (("native", "native"), ("ours", "ours-dense")):
        for bits in ("fp16", "bf16"):
            assert rows[f"{impl}-{bits}"]["mib_sent_per_rank"] == pytest.approx(rows[dense]["mib_sent_per_rank"] / 2)
    # MiBs of gradients over a 1 Gbit/s link cost more than the tiny model's compute: exposed, and timed
    assert rows["native"]["vs_compute_only"] > 1 and rows["native"]["exposed_comm_ms"] > 0
    assert rows["native"]["link_ms"] == pytest.approx(rows["native"]["mib_sent_per_rank"] * 2**20 * 8 / 1e9 * 1e3)
    saved = json.loads((tmp_path / "link.json").read_text())
    assert saved["topology"]["nodes"] == 2 and saved["topology"]["link"] == "1gbit" and saved["topology"]["emulated"]
    md = (tmp_path / "link.md").read_text()
    assert md.startswith("Topology: 2 nodes x 1 rank, links 1gbit") and "| 1gbit | ours-bf16 |" in md
