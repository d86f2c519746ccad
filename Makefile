PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A second venv with every runtime dependency at the floor pyproject.toml declares.
OLDEST := .venv-oldest
OLDEST_BIN := $(OLDEST)/bin
FLOOR_PINS := import re, tomllib; \
	deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
	print("\n".join(re.sub(r"\s*>=\s*", "==", d) for d in deps))
MULTIDEVICE := XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: demo test test-oldest bench lint docs clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-examples: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[examples]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,examples,docs]'
	touch $@

demo: $(VENV)/.installed-examples
	$(BIN)/python examples/demo.py --out demo_out

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

# The documentation site (docs/_build/html): warnings are errors, and every guide runs (-E: each
# build reads every page again, so a guide reruns even when only jaxstab changed).
docs: $(VENV)/.installed-test
	$(BIN)/sphinx-build -E -W --keep-going -q -b html docs docs/_build/html

$(OLDEST)/.installed: pyproject.toml
	$(PY) -m venv $(OLDEST)
	$(OLDEST_BIN)/pip install --quiet --upgrade pip
	$(PY) -c '$(FLOOR_PINS)' > $(OLDEST)/floors.txt
	$(OLDEST_BIN)/pip install --quiet -c $(OLDEST)/floors.txt -e '.[test,examples]'
	touch $@

test: lint docs
	$(BIN)/python -m pytest -q -m "not multidevice"
	$(MULTIDEVICE) $(BIN)/python -m pytest -q -m multidevice tests

# The same suite on the declared dependency floors (jax, jaxlib, optax, flax, chex pinned).
test-oldest: $(OLDEST)/.installed
	$(OLDEST_BIN)/python -m pytest -q -m "not multidevice"
	$(MULTIDEVICE) $(OLDEST_BIN)/python -m pytest -q -m multidevice tests

bench: $(VENV)/.installed-examples
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(OLDEST) demo_out docs/_build docs/jupyter_execute
