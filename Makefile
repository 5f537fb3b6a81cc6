# The two commands of the README's Quick start:
#   make demo   - the main job on the embedded default data (a synthetic walking tour)
#   make test   - the whole test suite
# Both create or refresh .venv first (scripts/setup_venv.sh) and are safe to run twice.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv demo test bench clean
venv:
	@WTOURS_VENV=$(VENV) bash scripts/setup_venv.sh

demo: venv
	$(VENV)/bin/wtours pretrain --out runs/demo --config configs/video/tiny.yaml

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(VENV)/bin/wtours bench decode

clean:
	rm -rf runs/demo .pytest_cache
