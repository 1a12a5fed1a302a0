# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Both create .venv, install the exact torch/torchvision pins for this architecture (DESIGN.md §6),
# install the project, then run.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
ARCH    := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif
STAMP   := $(VENV)/.fedcmd-installed
DEMO    := runs/demo

.PHONY: setup test demo lint clean

setup: $(STAMP)

# The editable install compiles fedcmd_core._native (scikit-build-core + CMake): re-run it when the C++ changes.
$(STAMP): pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.hpp csrc/cuda/*.cu)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_PINS) -e '.[dev]'
	@touch $(STAMP)

lint: setup
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider

demo: setup
	$(BIN)/fedcmd data partition -d mnist5k -a 0.1 -cn 20 -ls 20 --seed 42 --out $(DEMO)/partition.npz --force
	$(BIN)/fedcmd simulate --algo fedcmd -d mnist5k --partition $(DEMO)/partition.npz -jr 0.25 -ge 40 --out $(DEMO)/fedcmd --force
	$(BIN)/fedcmd simulate --algo fedavg -d mnist5k --partition $(DEMO)/partition.npz -jr 0.25 -ge 40 --out $(DEMO)/fedavg --force
	$(BIN)/fedcmd compare $(DEMO)/fedcmd $(DEMO)/fedavg

clean:
	rm -rf $(VENV) runs build *.egg-info
