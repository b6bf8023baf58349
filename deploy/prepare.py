"""From a trained checkpoint to the files of a free deployment: one command per route (docs/deploy.md).

    python -m deploy.prepare space checkpoint.tar.gz --out runs/space   # make space CHECKPOINT=...
    python -m deploy.prepare render checkpoint.tar.gz                   # make render CHECKPOINT=...

CHECKPOINT is the Kaggle notebook's `checkpoint.tar.gz` (kaggle/distrinews_2xT4.ipynb), or any
checkpoint directory (`experiments.train --output-dir DIR` writes DIR/checkpoint). Both routes
first export it with `python -m experiments.export` (ONNX, float32 and int8; with `--data-dir`,
also its parity check on the test split), unless it already holds onnx/model_quantized.onnx.

- `space`: the folder of a static Hugging Face Space (free for everyone): the page
  (deploy/static/index.html, app.js, README.md with `sdk: static`), the pinned npm packages
  copied from node_modules into vendor/ (deploy/static/package.json and package-lock.json;
  `npm ci` into a cache folder, once per lock file), the int8 model and its tokenizer in model/,
  and a .gitattributes that stores the large files through Git LFS / Xet. The page classifies in
  the visitor's browser. Then push the folder (the command prints how); nothing is uploaded here.
- `render`: the exported model into deploy/checkpoint/ (`--into`), the folder the torch-free
  image bakes in, with only what the ONNX server reads (no safetensors, no float32 ONNX), for a
  Render web service built from your repository. It prints the remaining steps.

Exit statuses (distrinews/errors.py): 0 done, 2 a bad checkpoint or option (the message says what
to do), 1 a failure of a tool it runs (npm, the export's check).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from distrinews.errors import DistriNewsError, UsageError, guard

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "deploy" / "static"
PAGE_FILES = ("index.html", "app.js", "README.md")  # deploy/static/'s files the Space serves
INT8 = "onnx/model_quantized.onnx"
# what the page and the ONNX server read from an export (experiments/export.py's layout)
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", INT8)
SERVER_EXTRA = ("special_tokens_map.json", "training_args.json")  # read when present
# stored through Git LFS / Xet by the Hub: files over 10 MB must be, and these may be
LARGE = ("*.onnx", "*.wasm")


class RouteError(UsageError):
    """The checkpoint or an option is not usable; the message says what to do (exit 2)."""


class ToolFailed(DistriNewsError):
    """npm or the export's parity check failed (exit 1)."""


# ---- the checkpoint -------------------------------------------------------------------------
def open_checkpoint(path: Path, work: Path) -> Path:
    """The checkpoint directory: `path` itself, or the one folder with a config.json that the
    archive `path` (.tar.gz, .tgz, .tar) holds, extracted under `work`. Raises RouteError."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RouteError(f"{path} has no config.json: pass a checkpoint directory (DIR/checkpoint) or its .tar.gz")
        return path
    if not path.is_file():
        raise RouteError(f"{path} does not exist: pass the notebook's checkpoint.tar.gz or a checkpoint directory")
    if not tarfile.is_tarfile(path):
        raise RouteError(f"{path} is neither a directory nor a tar archive (the notebook writes checkpoint.tar.gz)")
    with tarfile.open(path) as tar:
        tar.extractall(work, filter="data")  # "data": no absolute paths, links out or devices
    found = sorted(p.parent for p in work.rglob("config.json"))
    if len(found) != 1:
        raise RouteError(f"{path} holds {len(found)} folders with a config.json; expected one checkpoint")
    return found[0]


def exported(checkpoint: Path, work: Path, data_dir: str | None) -> Path:
    """A folder in the export's layout: `checkpoint` itself when it holds the int8 model, else a new
    export under `work` (`experiments.export`; its parity check when `data_dir` is given)."""
    if (checkpoint / INT8).is_file():
        return checkpoint
    from experiments import export

    out = work / "export"
    args = [str(checkpoint), "--out", str(out)] + (["--data-dir", data_dir] if data_dir else ["--no-check"])
    status = export.main(args)
    if status == 2:
        raise RouteError(f"the export of {checkpoint} failed (its message above says why)")
    if status != 0:
        raise ToolFailed(f"the export of {checkpoint} failed its parity check (exit {status}; see above)")
    return out


def max_length(model: Path) -> int:
    """Tokens per text as the server keeps them (server/checkpoint.py's one rule)."""
    from server.checkpoint import Checkpoint

    return Checkpoint.open(model).max_length()


def _trained_model_name(model: Path) -> str:
    """The training run's --model (training_args.json, read as the server reads it), else "classifier"."""
    from server.checkpoint import Checkpoint

    return Checkpoint.open(model).training_args.get("model") or "classifier"


# ---- the static Space -------------------------------------------------------------------------
def node_modules(cache: Path) -> Path:
    """`npm ci` of deploy/static's package.json and package-lock.json into `cache` (once per lock:
    a later call with the same lock reuses it). Returns cache/node_modules. Raises ToolFailed."""
    lock = (STATIC / "package-lock.json").read_bytes()
    stamp = cache / "lock.sha256"
    digest = hashlib.sha256(lock).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest and (cache / "node_modules").is_dir():
        return cache / "node_modules"
    npm = shutil.which("npm")
    if npm is None:
        raise ToolFailed("npm is not installed: install Node.js 20 or newer (it brings npm), then run this again")
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copy2(STATIC / name, cache / name)
    # --ignore-scripts: the packages' files are all we copy; no install script runs
    r = subprocess.run(
        [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"], cwd=cache, text=True
    )
    if r.returncode != 0:
        raise ToolFailed(f"npm ci in {cache} failed (exit {r.returncode}); its output is above")
    stamp.write_text(digest)
    return cache / "node_modules"


def vendor_files() -> dict[str, str]:
    """vendor/ file name -> its path under node_modules (deploy/static/package.json's "vendor")."""
    return json.loads((STATIC / "package.json").read_text())["vendor"]


def build_space(model: Path, out: Path, cache: Path, model_name: str) -> dict:
    """Write the static Space into `out` (replaced if it exists). Returns model/distrinews.json."""
    from server.pages import EXAMPLES

    modules = node_modules(cache)
    if out.exists():
        shutil.rmtree(out)
    (out / "vendor").mkdir(parents=True)
    for name in PAGE_FILES:
        shutil.copy2(STATIC / name, out / name)
    for name, source in vendor_files().items():
        shutil.copy2(modules / source, out / "vendor" / name)
    (out / "model" / "onnx").mkdir(parents=True)
    for name in MODEL_FILES:
        if not (model / name).is_file():
            raise RouteError(f"{model} has no {name}: export it again with python -m experiments.export")
        shutil.copy2(model / name, out / "model" / name)
    sizes = {name: (out / "model" / name).stat().st_size for name in MODEL_FILES}
    info = {
        "model": model_name,
        "onnx": INT8,
        "max_length": max_length(model),
        "bytes": sizes,
        "download_bytes": sum(sizes.values()),  # what the page fetches of the model (the page and vendor/ aside)
        "examples": EXAMPLES,
    }
    (out / "model" / "distrinews.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / ".gitattributes").write_text("".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LARGE))
    missing = missing_space_files(out)
    if missing:  # a file the page asks for that the folder lacks: a bug here, never the user's
        raise ToolFailed(f"the Space in {out} lacks {missing}")
    return info


def missing_space_files(out: Path) -> list[str]:
    """Files the Space needs that `out` lacks: the page's, vendor/'s, the model's, the front matter."""
    need = [*PAGE_FILES, *(f"vendor/{n}" for n in vendor_files()), *(f"model/{n}" for n in MODEL_FILES)]
    need.append("model/distrinews.json")
    missing = [n for n in need if not (out / n).is_file()]
    readme = out / "README.md"
    if readme.is_file() and "\nsdk: static\n" not in readme.read_text().split("\n---\n")[0] + "\n":
        missing.append("README.md front matter `sdk: static`")
    return missing


# ---- Render ----------------------------------------------------------------------------------
def stage_for_render(model: Path, into: Path) -> list[str]:
    """Replace `into`'s contents (its README placeholder kept) with what the ONNX server reads.
    Returns the file names copied. `cp -r DIR/. into/` semantics: the files, not a DIR/ inside."""
    into.mkdir(parents=True, exist_ok=True)
    for p in into.iterdir():
        if p.name != "README":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    copied = []
    for name in (*MODEL_FILES, *SERVER_EXTRA):
        if (model / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model / name, into / name)
            copied.append(name)
        elif name in MODEL_FILES:
            raise RouteError(f"{model} has no {name}: export it again with python -m experiments.export")
    return copied


# ---- the command -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deploy.prepare",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="route", required=True)
    for route, helps in (("space", "a static Hugging Face Space (free)"), ("render", "Render's free web service")):
        r = sub.add_parser(route, help=helps)
        r.add_argument("checkpoint", type=Path, help="checkpoint.tar.gz (the Kaggle notebook's) or a checkpoint dir")
        r.add_argument("--data-dir", default=None, help="AG News CSVs: run the export's parity check on the test split")
        r.add_argument("--model-name", default=None, help="the name the page shows (default: the training run's)")
    sub.choices["space"].add_argument("--out", type=Path, default=Path("runs/space"), help="the Space folder to write")
    sub.choices["space"].add_argument(
        "--npm-cache", type=Path, default=ROOT / ".cache" / "static-space", help="where npm ci installs (reused)"
    )
    sub.choices["render"].add_argument(
        "--into", type=Path, default=ROOT / "deploy" / "checkpoint", help="the folder the image bakes in"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m deploy.prepare space|render`: the exit status of distrinews/errors.py's policy."""
    args = build_parser().parse_args(argv)
    return guard(lambda: _prepare(args))


def _prepare(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="distrinews-route-") as tmp:
        checkpoint = open_checkpoint(args.checkpoint, Path(tmp) / "checkpoint")
        model = exported(checkpoint, Path(tmp), args.data_dir)
        name = args.model_name or _trained_model_name(model)
        if args.route == "space":
            info = build_space(model, args.out, args.npm_cache, name)
            print(space_done(args.out, info))
        else:
            copied = stage_for_render(model, args.into)
            print(render_done(args.into, copied))


def space_done(out: Path, info: dict) -> str:
    mb = info["download_bytes"] / 1e6
    return f"""wrote the static Space in {out}: the page, vendor/ (onnxruntime-web, @huggingface/tokenizers) and
model/ ({info["model"]}, int8: {mb:.1f} MB for the visitor to download; texts cut to {info["max_length"]} tokens).
Try it here:  python -m http.server -d {out} 8001   then open http://localhost:8001/
Publish it (a Space created with the Static SDK at https://huggingface.co/new-space, free):
  hf upload YOUR-NAME/SPACE-NAME {out} . --repo-type space
or with git (git-xet or git-lfs installed; .gitattributes sends *.onnx and *.wasm through it):
  git clone https://huggingface.co/spaces/YOUR-NAME/SPACE-NAME space && cp -r {out}/. space/
  cd space && git add . && git commit -m "DistriNews static Space" && git push"""


def render_done(into: Path, copied: list[str]) -> str:
    return f"""copied {", ".join(copied)} into {into}/ (the ONNX server's files: no torch weights).
Try the image as Render will build it (needs docker):
  docker build -t distrinews-onnx -f deploy/Dockerfile.onnx . && docker run --rm -p 7860:7860 distrinews-onnx
Then: git add -f {into} && git commit -m "model for Render" && git push   (to your GitHub repository)
and on Render: New -> Web Service -> the repository, Runtime Docker, Dockerfile Path deploy/Dockerfile.onnx,
Instance type Free, Health Check Path /ready (docs/deploy.md, "Render (free)")."""


if __name__ == "__main__":
    sys.exit(main())
