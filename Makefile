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

.PHONY: setup test demo lint clean hil-arm wheels

setup: $(STAMP)

# The editable install compiles fedcmd_core._native (scikit-build-core + CMake): re-run it when the C++ changes.
$(STAMP): pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.hpp csrc/cuda/*.cu)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --no-compile $(TORCH_PINS) -e '.[dev]'
	@touch $(STAMP)

lint: setup
	$(BIN)/ruff check .

# Two pytest-xdist workers: most tests wait on brokers, subprocesses and sockets, so two share two cores well;
# the hardware-in-the-loop tests go to one worker together (tests/conftest.py). TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2

# tests/system_deps.sh installs mosquitto and chromium with apt-get when run as root (else those tests skip,
# with the reason in the summary)
test: setup lint
	@bash tests/system_deps.sh
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup

demo: setup
	$(BIN)/fedcmd data partition -d mnist5k -a 0.1 -cn 20 -ls 20 --seed 42 --out $(DEMO)/partition.npz --force
	$(BIN)/fedcmd simulate --algo fedcmd -d mnist5k --partition $(DEMO)/partition.npz -jr 0.25 -ge 40 --out $(DEMO)/fedcmd --force
	$(BIN)/fedcmd simulate --algo fedavg -d mnist5k --partition $(DEMO)/partition.npz -jr 0.25 -ge 40 --out $(DEMO)/fedavg --force
	$(BIN)/fedcmd compare $(DEMO)/fedcmd $(DEMO)/fedavg

# The emulated Raspberry Pi (tests/hil/README.md, "The aarch64 device"): a cached Debian bookworm arm64 rootfs
# under qemu user-mode (~/.cache/fedcmd/hil-arm, FEDCMD_HIL_ARM_CACHE), the mixed x86 + aarch64 namespace
# fleet, the conformance suite and test_arm.py against it. Root, qemu-user-static, binfmt-support, debootstrap.
HIL_ARM_REPORT ?= runs/hil-arm
hil-arm: setup
	$(BIN)/python tests/hil/arm_rootfs.py build
	$(BIN)/python tests/hil/arm_rootfs.py wheel --out dist
	FEDCMD_HIL_ARM_REPORT=$(HIL_ARM_REPORT) $(BIN)/python -m pytest -q -rs -p no:cacheprovider -m hil --hil-arm tests/hil

# dist/: the x86_64 wheel built here (its own CMake tree, not the editable install's) and the aarch64 wheel
# built inside the emulated Pi's rootfs (what a Pi installs: deploy/README.md).
wheels: setup
	$(BIN)/pip wheel -q --no-deps -w dist -Cbuild-dir=build/wheel-{wheel_tag} .
	$(BIN)/python tests/hil/arm_rootfs.py wheel --out dist
	@ls -l dist/*.whl

clean:
	rm -rf $(VENV) runs build *.egg-info
