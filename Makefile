# Everything a fresh machine needs: `make demo`, `make test`. Both create and use .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT := demo-out

.PHONY: demo test lint weights install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

weights: $(STAMP)
	$(PY) -m segany weights fetch mobile_sam

demo: weights
	$(PY) -m segany segment examples/kitchen.jpg --point 440,330 --all-masks \
		--out $(DEMO_OUT)/mask.png --overlay $(DEMO_OUT)/overlay.png
	@echo "demo outputs in $(DEMO_OUT)/"

lint: $(STAMP)
	$(PY) -m ruff check segany tests benchmarks
	$(PY) -m ruff format --check segany tests benchmarks

test: weights lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
