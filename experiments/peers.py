"""Which peer became unreachable: one clear line when a collective fails on the network.

gloo names the peer when a connection closes (`Connection closed by peer [10.231.0.2]:63107`,
a process that died), but not when a collective times out (`Timed out waiting 6000ms for recv
operation to complete`: a peer that hangs, or a network partition). So at start every rank
learns each rank's address (`gather`, one small all-gather), and when a collective fails, the rank
asks each peer machine for a TCP connection (`probe`): an answer, even a refusal, means the
machine is reachable; silence for PROBE_S means it is not. `explain` turns that into one line:

    error: rank 0: the collective failed (Timed out waiting 6000ms for recv operation to complete);
    unreachable: rank 1 at 10.231.0.2 (no answer within 1 s: its machine or the network between is down)

The probe is one TCP SYN to port 9 (discard) of each peer's address, nothing else.
"""

from __future__ import annotations

import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor

from . import distributed as D

PROBE_S = 1.0
_NETWORK = ("Timed out", "timed out", "Connection closed", "Connection reset", "Broken pipe", "Connection refused")


def local_address() -> str:
    """This process's address on the route to MASTER_ADDR (a UDP `connect` sends no packet)."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


def gather(env: D.DistEnv) -> list[str]:
    """Every rank's address, in rank order (on every rank; [own] in one process)."""
    return D.all_gather_object(env, local_address())


def probe(address: str, timeout_s: float = PROBE_S) -> bool:
    """Whether the machine at `address` answers a TCP connection within `timeout_s` (a refusal counts)."""
    try:
        socket.create_connection((address, 9), timeout=timeout_s).close()
        return True
    except ConnectionRefusedError:
        return True
    except OSError:  # timeout, no route to host
        return False


def explain(error: BaseException, env: D.DistEnv, addresses: list[str]) -> str | None:
    """One line naming the unreachable peers after a network failure of a collective; None for
    other errors (or when every peer answers: then a peer process hangs or died, not the network)."""
    text = str(error)
    if not any(marker in text for marker in _NETWORK) or len(addresses) < 2:
        return None
    mine = addresses[env.rank]
    others = sorted({a for a in addresses if a != mine})  # ranks on this machine share its address
    with ThreadPoolExecutor(max(1, len(others))) as pool:
        answers = dict(zip(others, pool.map(probe, others)))
    down = [f"rank {r} at {a}" for r, a in enumerate(addresses) if a != mine and not answers[a]]
    # gloo's message without its source location and advice: "Read error [10.231.0.2]:50850: Connection reset by peer"
    short = re.sub(r"^\[[^\]]*:\d+\]\s*", "", text.strip().splitlines()[0]).split(". ")[0][:200]
    if not down:
        return f"the collective failed ({short}); every peer machine answers, so a peer process hangs or died"
    return (
        f"the collective failed ({short}); unreachable: {', '.join(down)} (no answer within {PROBE_S:g} s: "
        "its machine or the network between is down)"
    )
