# The two commands of the README's Quick start, and the proof that training learns:
#   make demo   - the main job on the embedded default data: the tiny pipeline (video stage -> eval -> NeCo ->
#                 eval -> report) on a synthetic walking tour, runs/demo/ (a few minutes on 2 CPU cores)
#   make test   - the whole test suite
#   make proof  - proof that training learns: stage 1 vs random init over 3 seeds (writes runs/proof/
#                 and the README's proof block; ~10+ minutes on 2 CPU cores)
# Each creates or refreshes .venv first (scripts/setup_venv.sh) and is safe to run twice.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv demo test bench proof clean
venv:
	@WTOURS_VENV=$(VENV) bash scripts/setup_venv.sh

demo: venv
	$(VENV)/bin/wtours pretrain --pipeline tiny --out runs/demo

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(VENV)/bin/wtours bench decode

proof: venv
	$(VENV)/bin/wtours bench learn --readme README.md

clean:
	rm -rf runs/demo .pytest_cache
