# The two commands of the README's Quick start, and the proof that training learns:
#   make demo   - the main job on the embedded default data: the tiny pipeline (video stage -> eval -> NeCo ->
#                 eval -> report) on a synthetic walking tour, runs/demo/ (a few minutes on 2 CPU cores)
#   make test   - the whole test suite
#   make proof  - proof that training learns: stage 1 vs random init over 3 seeds (writes runs/proof/
#                 and the README's proof block; ~10+ minutes on 2 CPU cores)
#   make gpu-wheels     - download here the wheels the GPU machine lacks (gpu-wheels/, carried to it)
#   make gpu-check      - on a GPU machine: the one-call check (scripts/gpu_check.sh; <= 9 min on one H200)
#   make gpu-check-dry  - the same phases on CPU at toy sizes (tests/test_gpu_check.py runs it too)
# Each creates or refreshes .venv first (scripts/setup_venv.sh) and is safe to run twice.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv demo test bench proof gpu-wheels gpu-check gpu-check-dry clean
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

gpu-wheels: venv
	bash scripts/gpu_wheels.sh

gpu-check:
	bash scripts/gpu_check.sh

gpu-check-dry: venv
	GPU_CHECK_DRY=1 PY=$(abspath $(PY)) bash scripts/gpu_check.sh

clean:
	rm -rf runs/demo .pytest_cache
