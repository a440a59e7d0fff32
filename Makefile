PY ?= .venv/bin/python
.PHONY: install test test-slow bench lint asan
install:
	bash scripts/install.sh
test:
	$(PY) -m pytest -q tests
test-slow:
	$(PY) -m pytest -q tests -m slow
bench:
	$(PY) bench/throughput.py --json bench/results/latest.json
lint:
	$(PY) -m ruff check .
asan:
	bash scripts/asan_fuzz.sh
