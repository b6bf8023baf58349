"""Every bench part on the emulated cluster: `python -m experiments.bench --cluster 2x1 --link RATE`.

One part (ring, quick: 1 MiB all-reduces and their pieces, no model) runs on 2 nodes joined by 1 Gbit/s
links (experiments/cluster/: namespaces this test's launcher creates and removes, a few hundred
KB between them); its table, JSON and the run's README say the topology. Skipped without root or
network namespaces, as tests/cluster/test_cluster.py. About 20 s on 2 cores.
"""

from __future__ import annotations

import json

import pytest
from support.namespaces import needs_namespaces

from distrinews.errors import UsageError
from experiments import cluster, processes
from experiments.bench.__main__ import main
from experiments.bench.common import launch
from experiments.launch import TOPOLOGY_ENV, Cluster, Launch


def test_outside_a_cluster_every_result_says_one_node():
    assert launch.topology(None)["description"] == "1 node, unshaped"
    assert Launch(2).command("m", [])[1:3] == ["-m", "torch.distributed.run"]
    two = Cluster.parse("2x1", "500mbit")
    cmd = Launch(4, two).command("experiments.bench.common", ["--part", "step"])
    # 4 ranks on a 2-node cluster: 2 per node; 1 rank: one node
    assert cmd[1:9] == ["-m", "experiments.cluster", "--nodes", "2", "--nproc-per-node", "2", "--link", "500mbit"]
    assert two.layout(1) == Cluster(1, 1, "500mbit") and two.layout(3) == Cluster(1, 3, "500mbit")
    assert launch.compare_flags(two) == ["--cluster", "2x1", "--link", "500mbit"]
    assert launch.topology(two)["description"] == "2 nodes x 1 rank, links 500mbit (emulated cluster)"
    assert Cluster.from_env({TOPOLOGY_ENV: two.env_value()}) == two  # what the cluster's launcher tells a rank
    with pytest.raises(UsageError, match="NODESxRANKS"):
        Cluster.parse("2by1")


def test_bad_cluster_option_is_a_usage_error(tmp_path, capsys):
    assert main(["--quick", "--only", "step", "--cluster", "2x1", "--link", "fast", "--out", str(tmp_path)]) == 2
    assert "link rate 'fast'" in capsys.readouterr().err


@pytest.mark.slow
@needs_namespaces
def test_a_part_runs_on_two_nodes_and_its_result_says_so(tmp_path):
    assert main(["--quick", "--only", "ring", "--cluster", "2x1", "--link", "1gbit", "--out", str(tmp_path)]) == 0
    want = "2 nodes x 1 rank, links 1gbit (emulated cluster)"
    saved = json.loads((tmp_path / "ring" / "ring.json").read_text())
    assert saved["topology"] == {
        "nodes": 2,
        "nproc_per_node": 1,
        "link": "1gbit",
        "emulated": True,
        "description": want,
    }
    # the bytes crossed the 1 Gbit/s link: 2 steps of 1/2 MiB each way take at least 0.8 x 8.4 ms
    assert saved["tables"]["2"]["ms"]["gloo all-reduce"] >= 0.8 * 2 * 2**19 * 8 / 1e9 * 1e3
    assert f"Topology: {want}" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "ring" / "ring.md").read_text().startswith(f"Topology: {want}.")
    assert json.loads((tmp_path / "summary.json").read_text())["topology"]["nodes"] == 2
    owners = [ns[len(cluster.PREFIX) :].split("-")[0] for ns in cluster.our_namespaces()]
    assert not [o for o in owners if o.isdigit() and not processes.alive(int(o))]  # nothing left behind
