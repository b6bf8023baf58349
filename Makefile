# Two commands set everything up on a fresh machine:
#   make main   # venv + install, then the side-by-side run on AG News (1 process, native DDP, hand-written DDP)
#   make test   # venv + install, then the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch, pinned here (not in pyproject.toml) so GPU users keep their CUDA build.
TORCH  ?= torch==2.13.0
# Where torch comes from (docs/setup.md): on Linux without an NVIDIA GPU, PyTorch's CPU wheel index
# (a ~200 MB wheel instead of a multi-GB CUDA build); with one (nvidia-smi lists a GPU), and on macOS
# (whose wheels are CPU builds), the default index. When the CPU index cannot be reached (this
# project's machines, behind a registry mirror), pip gives up on it within seconds (--timeout 5
# --retries 0) and the plain install of today runs. Override: TORCH_INDEX= (default index) or a URL.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_NVIDIA_GPU := $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo yes)
TORCH_INDEX ?= $(if $(HAS_NVIDIA_GPU),,$(if $(filter Linux,$(shell uname -s)),$(TORCH_CPU_INDEX),))
PIP    := $(BIN)/python -m pip install --quiet

NPROC  ?= 2
# AG News: the CSVs in ../shared/ag_news when they are there, else the Hugging Face hub
DATA   ?= $(if $(wildcard ../shared/ag_news/train.csv),../shared/ag_news,)
MODEL  ?= minilm-l6
MAIN_ARGS ?= --max-train-samples 4000 --max-length 64 --batch-size 16 --epochs 1 --lr 1e-4

.PHONY: install main test test-fast test-kaggle-versions test-gpu gpu-check lint bench bench-gpu doctor exercise clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PIP) --timeout 5 --retries 0 --index-url $(TORCH_INDEX) "$(TORCH)" || ,)$(PIP) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[offline,dev]"
	touch $@

main: install
	$(BIN)/python -m experiments.compare --nproc $(NPROC) $(if $(DATA),--data-dir $(DATA),) --model $(MODEL) $(MAIN_ARGS)

# The fast checks first (lint and format, seconds), then the test suite (minutes); the 15 slowest
# tests are listed at the end, so that drift shows. TEST_WORKERS pytest-xdist workers (one per core
# here), files grouped as tests/conftest.py says; TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)
# The notebook's execution (marked `notebook`) is left to test-kaggle-versions, which runs it on Kaggle's versions.
test: install lint
	$(BIN)/python -m pytest -q $(XDIST) -m "not notebook" --durations=15

# A learner's first check: everything but the tests marked slow (real trainings, restarts, namespaces)
test-fast: install
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" --durations=10

# The fast tests again, on Kaggle's versions (kaggle/constraints.txt: torch 2.10, transformers 5.0), in a second
# venv, and the Kaggle notebook executed top to bottom there (marked `notebook`, offline, on the CPU: 97 CPU-seconds);
# it prints the versions it tested. torch from the same index as `install` (PyPI's is the ~3.2 GB CUDA build,
# which runs on the CPU too; pip's cache, ~/.cache/pip, keeps it between runs on one machine).
KAGGLE_VENV ?= .venv-kaggle
# The server is deployed from its own image (deploy/requirements-server.txt, the newest versions), never with
# Kaggle's: its image test does not apply there (and with transformers 5.0.0 importing the server also imports
# datasets, pandas, pyarrow and matplotlib, which the image leaves out).
KAGGLE_DESELECT := --deselect tests/server/test_server.py::test_the_server_uses_only_what_its_image_installs
KAGGLE_PIP  := $(KAGGLE_VENV)/bin/python -m pip install --quiet
# setuptools upgraded (Python 3.11's venv brings 65.5, older than pyproject.toml's build-system asks and without
# bdist_wheel): the notebook's install cell, run offline there (pip --no-build-isolation), builds our metadata with it.
test-kaggle-versions: $(KAGGLE_VENV)/.installed
	$(KAGGLE_VENV)/bin/python -c "import sys, torch, transformers, datasets; print(f'Kaggle versions: python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, datasets {datasets.__version__}')"
	$(KAGGLE_VENV)/bin/python -m pytest -q $(XDIST) -m "not slow or notebook" $(KAGGLE_DESELECT)

$(KAGGLE_VENV)/.installed: pyproject.toml kaggle/constraints.txt Makefile
	$(PYTHON) -m venv $(KAGGLE_VENV)
	$(KAGGLE_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools
	$(if $(TORCH_INDEX),$(KAGGLE_PIP) --timeout 5 --retries 0 --index-url $(TORCH_INDEX) torch -c kaggle/constraints.txt || ,)$(KAGGLE_PIP) torch -c kaggle/constraints.txt
	$(KAGGLE_PIP) -e ".[offline,dev]" -c kaggle/constraints.txt
	touch $@

# On a machine with CUDA GPUs (a CUDA build of torch: make install TORCH=torch): every tier it can run,
# the one-GPU tier on one GPU, both on two (tests/gpu/conftest.py skips the rest, saying why)
test-gpu: install
	$(BIN)/python -m pytest -q -m gpu tests/gpu

# The first GPU we get: GPU tests, short NCCL trainings of every stage, the doctor, the step benchmark; one summary.
# With the interpreter you name and its own (CUDA) torch: no install step, no .venv, no pip (make gpu-check PY=python3;
# GPU_CHECK_ARGS=--quick for the 5-minute form). PY defaults to the venv's python, for who ran make install.
PY ?= $(BIN)/python
gpu-check:
	@command -v $(PY) >/dev/null || { echo "no $(PY): run make install, or name a python with its torch: make gpu-check PY=python3" >&2; exit 1; }
	$(PY) -m experiments.gpu_check $(GPU_CHECK_ARGS)

# One exercise's tests against your file: make exercise NAME=step1_explicit (no NAME: the list; docs/exercises.md)
exercise: install
	$(BIN)/python -m exercises $(NAME)

doctor: install
	$(BIN)/python -m experiments.doctor

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m experiments.bench

bench-gpu: install
	$(BIN)/python -m experiments.bench.step --gpu --precision fp32 --out runs/bench/step-gpu-fp32
	$(BIN)/python -m experiments.bench.step --gpu --precision fp16 --out runs/bench/step-gpu-fp16
	$(BIN)/python -m experiments.bench.allreduce --gpu --out runs/bench/allreduce-gpu

clean:
	rm -rf $(VENV) $(KAGGLE_VENV) runs
