# Everything a fresh machine needs: `make demo`, `make test`. Both create and use .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT := demo-out

.PHONY: demo test lint weights install clean system-deps web-runtime

# Debian packages the tests use (the annotator's e2e tests run the system Chromium, its API
# tests start a PostgreSQL server); installed only when missing. CI runs as root, no stdin.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@missing=0; \
	command -v chromium >/dev/null 2>&1 || missing=1; \
	command -v chromedriver >/dev/null 2>&1 || missing=1; \
	command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=1; \
	if [ $$missing = 1 ]; then \
		echo "installing Debian packages: chromium chromium-driver postgresql fonts-dejavu-core"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			chromium chromium-driver postgresql fonts-dejavu-core; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# onnxruntime-web for the annotator's browser decoder: the pinned version from the npm
# registry, its SHA-512 checked, into the segany cache (no npm needed). Without it the
# annotator decodes every click on the server.
web-runtime: $(STAMP)
	$(PY) -m segany.engine.ortweb || echo "annotator: the browser decoder stays off (server decoding)"

weights: $(STAMP)
	$(PY) -m segany weights fetch mobile_sam

demo: weights
	$(PY) -m segany segment examples/kitchen.jpg --point 440,330 --all-masks \
		--out $(DEMO_OUT)/mask.png --overlay $(DEMO_OUT)/overlay.png
	@echo "demo outputs in $(DEMO_OUT)/"

lint: $(STAMP)
	$(PY) -m ruff check segany tests benchmarks
	$(PY) -m ruff format --check segany tests benchmarks

# Two pytest workers (pytest-xdist), a test file each at a time: much of the suite waits on
# servers, browsers and single-threaded subprocesses; each worker's torch gets one thread
# (tests/conftest.py) so that the two never oversubscribe the cores.
test: weights web-runtime lint system-deps
	$(PY) -m pytest -q --durations=15 -n 2 --dist loadfile

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
