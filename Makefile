# Two entry points for a fresh machine: `make demo` and `make test`. Both create or reuse .venv/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Exact pins for the setup step (ranges live in pyproject.toml).
PINS := torch==2.14.1 torchvision==0.29.1 nvidia-dali-cuda130==2.4.0 kornia==0.9.0 av pyyaml numpy \
        opencv-python-headless pytest scipy matplotlib scikit-video tqdm

.PHONY: demo test venv clean bench
$(BIN)/.ready: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PINS)
	$(BIN)/pip install -q --no-deps -e .
	touch $@

venv: $(BIN)/.ready

demo: venv
	$(BIN)/mscl-stream demo --out runs/demo

test: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/mscl-stream bench --config configs/bench.yaml

clean:
	rm -rf runs sample_data
