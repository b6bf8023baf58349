"""Whether this machine can build the emulated cluster's network namespaces (experiments/cluster/).

Probed once, when first imported: `WHY_NO_NAMESPACES` is None where Linux, root, iproute2 and
`ip netns add` all work, else the reason, which a skip reports; `needs_namespaces` is that skip as
a mark. The cluster's tests and the bench parts that run on it share this one probe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from experiments import cluster


def _namespaces_work() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs Linux, root and iproute2 (network namespaces)"
    probe = f"{cluster.PREFIX}probe-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "ip netns add is refused here (no network namespaces)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


WHY_NO_NAMESPACES = _namespaces_work()
needs_namespaces = pytest.mark.skipif(WHY_NO_NAMESPACES is not None, reason=WHY_NO_NAMESPACES or "")
