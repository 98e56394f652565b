# quantbench developer targets. `make quickstart` and `make test` work on a fresh clone with ../shared beside it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SHARED ?= ../shared
ASSETS := .assets

.PHONY: setup assets quickstart test test-slow test-unit leaderboard

setup: $(VENV)/.installed

# torch first, from the local CPU wheel, so nothing else can pull a CUDA build
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

assets: setup
	@if [ -d $(SHARED)/tools ]; then \
		$(PY) $(SHARED)/tools/materialize_assets.py --out $(ASSETS); \
	else \
		echo "$(SHARED) not found: offline model and data not built (integration tests will be skipped)"; \
	fi

quickstart: assets
	. $(ASSETS)/env.sh && $(VENV)/bin/quantbench run recipes/quickstart.yaml --force

# one pytest-xdist worker per core, each on one thread (tests/conftest.py); bytecode is written even where
# PYTHONDONTWRITEBYTECODE is set: the suite starts about 30 Python processes that import the package
PYTEST := PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n auto --dist worksteal

# `make test` leaves out the tests marked slow (the real model calibrated end to end, runs over several
# interpreters: about 40% of the suite's CPU time in 17 tests); `make test-slow` runs them; CI runs both
test: assets
	if [ -f $(ASSETS)/env.sh ]; then . $(ASSETS)/env.sh; fi; $(PYTEST) -m "not slow"

test-slow: assets
	if [ -f $(ASSETS)/env.sh ]; then . $(ASSETS)/env.sh; fi; $(PYTEST) -m slow

test-unit: setup
	$(PYTEST) -m "not integration and not slow"

# the leaderboard sweep of the README: every recipe in recipes/leaderboard/, the plain model's own evaluation,
# then the report (about two hours on 2 CPU cores)
LEADERBOARD_EVAL := --dataset wikitext2 --max-windows 16 --tasks piqa,arc_easy,hellaswag --limit 500 \
	--include-path $(ASSETS)/lm_eval_tasks
leaderboard: assets
	. $(ASSETS)/env.sh && for recipe in recipes/leaderboard/*.yaml; do \
		$(VENV)/bin/quantbench run $$recipe --force --quiet || exit 1; done
	. $(ASSETS)/env.sh && $(VENV)/bin/quantbench eval HuggingFaceTB/SmolLM2-135M-Instruct $(LEADERBOARD_EVAL) \
		--output runs/leaderboard/smollm2-135m-instruct --force --quiet
	$(VENV)/bin/quantbench report runs/leaderboard --out docs/leaderboard --force
	@if command -v chromium >/dev/null; then \
		chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1800,1700 \
			--screenshot=$(CURDIR)/docs/leaderboard/screenshot.png file://$(CURDIR)/docs/leaderboard/leaderboard.html; \
	else echo "chromium not installed (apt-get install chromium): no screenshot"; fi
