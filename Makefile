# Two commands set everything up on a fresh machine:
#   make main   # venv + install, then the side-by-side run on AG News (1 process, native DDP, hand-written DDP)
#   make test   # venv + install, then the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch; pinned here (not in pyproject.toml) so GPU users keep their CUDA build.
TORCH  ?= torch==2.13.0

NPROC  ?= 2
# AG News: the CSVs in ../shared/ag_news when they are there, else the Hugging Face hub
DATA   ?= $(if $(wildcard ../shared/ag_news/train.csv),../shared/ag_news,)
MODEL  ?= minilm-l6
MAIN_ARGS ?= --max-train-samples 4000 --max-length 64 --batch-size 16 --epochs 1 --lr 1e-4

.PHONY: install main test test-gpu lint bench bench-gpu doctor exercise clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[offline,dev]"
	touch $@

main: install
	$(BIN)/python -m experiments.compare --nproc $(NPROC) $(if $(DATA),--data-dir $(DATA),) --model $(MODEL) $(MAIN_ARGS)

# The fast checks first (lint and format, seconds), then the test suite (minutes).
test: install lint
	$(BIN)/python -m pytest -q

# On a machine with two CUDA GPUs (a CUDA build of torch: make install TORCH=torch)
test-gpu: install
	$(BIN)/python -m pytest -q -m gpu tests/gpu

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
	rm -rf $(VENV) runs
