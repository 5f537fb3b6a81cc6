# The two commands of the README's Quick start, and the proof that training learns:
#   make demo   - the main job on the embedded default data: the tiny pipeline (video stage -> eval -> NeCo ->
#                 eval -> report) on a synthetic walking tour, runs/demo/ (a few minutes on 2 CPU cores)
#   make test   - the whole test suite
#   make proof  - proof that training learns: stage 1 vs random init over 3 seeds (writes runs/proof/
#                 and the README's proof block; ~10+ minutes on 2 CPU cores)
#   make proof-long - a learning curve: one longer stage-1 run (video/proof_long) with snapshots, beside the GT-supervised
#                 curve of the same budget, every instrument (writes runs/proof-long/ and the README's curve block;
#                 <= 45 minutes on 2 CPU cores)
#   make calibration - every instrument's range: random vs pixels vs GT-supervised vs oracle (docs/calibration/)
#   make gpu-wheels     - download here the wheels the GPU machine lacks (gpu-wheels/, carried to it)
#   make gpu-check      - on a GPU machine: the one-call check (scripts/gpu_check.sh; <= 9 min on one H200)
#   make gpu-check-dry  - the same phases on CPU at toy sizes (tests/test_gpu_check.py runs it too)
# Each creates or refreshes .venv first (scripts/setup_venv.sh) and is safe to run twice.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv demo test bench proof proof-long calibration gpu-wheels gpu-check gpu-check-dry clean
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

PROOF_LONG_CONFIG ?= $(if $(wildcard configs/video/proof_long.yaml),video/proof_long,video/proof)
proof-long: venv
	$(VENV)/bin/wtours bench learn --curve --config $(PROOF_LONG_CONFIG) --seeds 0 --out runs/proof-long --readme README.md

calibration: venv
	$(VENV)/bin/wtours bench instruments --out runs/bench-instruments
	mkdir -p docs/calibration && cp runs/bench-instruments/instruments.json runs/bench-instruments/instruments.md docs/calibration/

gpu-wheels: venv
	bash scripts/gpu_wheels.sh

gpu-check:
	bash scripts/gpu_check.sh

gpu-check-dry: venv
	GPU_CHECK_DRY=1 PY=$(abspath $(PY)) bash scripts/gpu_check.sh

clean:
	rm -rf runs/demo .pytest_cache
