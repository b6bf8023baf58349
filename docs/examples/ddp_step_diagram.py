"""Draw one DDP step on two ranks: forward, backward filling buckets, all-reduces overlapping, optimizer step.

    python docs/examples/ddp_step_diagram.py            # writes docs/img/ddp_step.png

A concept diagram, not a measurement: the lengths are illustrative (a 4-layer model, gradients
ready in reverse order, 2 buckets). What it shows is the order of events in
ddp_from_scratch/minimal_buckets.py (on-ramp step 4) and torch's DDP: a bucket's all-reduce starts
as soon as its last gradient is ready, while backward still computes the earlier layers; the
optimizer steps only after the last all-reduce has been waited for (at the end of backward).
tests/docs/test_aids.py checks that the checked-in PNG is the one this script draws.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "img" / "ddp_step.png"
LAYERS = 4
FWD, BWD = 1.0, 2.0  # time units per layer: backward costs about twice forward
AR = 3.4  # one bucket's all-reduce
# buckets in the order gradients become ready (reverse of the layers): layers 4+3, then 2+1
BUCKETS = [(4, 3), (2, 1)]
COLORS = {"fwd": "#9ecae1", "bwd": "#fdae6b", "ar": "#a1d99b", "opt": "#bcbddc", "wait": "#eeeeee"}


def box(ax, x, y, w, h, color, text, fontsize=8):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="#444444", lw=0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def draw(path: Path = OUT) -> Path:
    """Draw the diagram into `path` (PNG, deterministic: no dates in the file); returns `path`."""
    fig, ax = plt.subplots(figsize=(11, 4.4), dpi=100)
    end_bwd = LAYERS * FWD + LAYERS * BWD
    for r, y0 in enumerate((2.4, 0.4)):
        compute_y, comm_y = y0 + 0.75, y0
        ax.text(-0.3, compute_y + 0.3, f"rank {r}\ncompute", ha="right", va="center", fontsize=9)
        ax.text(-0.3, comm_y + 0.3, "communication", ha="right", va="center", fontsize=9)
        t = 0.0
        for layer in range(1, LAYERS + 1):
            box(ax, t, compute_y, FWD, 0.6, COLORS["fwd"], f"fwd {layer}")
            t += FWD
        ready = {}
        for layer in range(LAYERS, 0, -1):
            box(ax, t, compute_y, BWD, 0.6, COLORS["bwd"], f"bwd {layer}\ngrad {layer} ready")
            t += BWD
            ready[layer] = t
        comm_t = 0.0
        for k, layers in enumerate(BUCKETS):
            start = max(comm_t, max(ready[x] for x in layers))  # launched when its last gradient is in
            label = f"all-reduce bucket {k}\n(grads {' + '.join(map(str, layers))})"
            box(ax, start, comm_y, AR, 0.6, COLORS["ar"], label, fontsize=7.5)
            comm_t = start + AR
        if comm_t > end_bwd:
            box(ax, end_bwd, compute_y, comm_t - end_bwd, 0.6, COLORS["wait"], "wait", fontsize=7.5)
        step_t = max(end_bwd, comm_t)
        box(ax, step_t, compute_y, 1.2, 0.6, COLORS["opt"], "optimizer\nstep")
    ax.annotate(
        "bucket 0 is sent while\nbackward computes layers 2 and 1",
        xy=(LAYERS * FWD + 2 * BWD, 2.7),
        xytext=(3.2, 2.05),
        fontsize=8.5,
        arrowprops={"arrowstyle": "->", "color": "#444444"},
        ha="center",
    )
    ax.text(
        0,
        -0.35,
        "Each rank: its own micro-batch forward and backward; gradients are ready in reverse layer order and are "
        "packed into buckets;\na full bucket's all-reduce (sum, then / world size) starts at once; at the end of "
        "backward every rank waits for the last one, then all take the same optimizer step.",
        fontsize=8,
        va="top",
    )
    ax.set_xlim(-2.6, step_t + 1.5)
    ax.set_ylim(-0.9, 4.0)
    ax.axis("off")
    ax.set_title("One DDP step on 2 ranks (illustrative lengths)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


if __name__ == "__main__":
    out = draw(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
    print(f"wrote {out}")
