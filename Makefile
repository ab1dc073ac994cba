# polarprune: train once with polarized gates, cut for real, serve on Triton, measure dense vs pruned.
# Every target bootstraps what it needs (venv, packages, data) on a fresh machine.
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
RUN      ?= fmnist_resnet20
CONFIG   ?= configs/$(RUN).yaml
RUN_DIR  ?= runs/$(RUN)
REPO     ?= model_repository
REPORTS  ?= reports/$(RUN)
TARGET   ?= cpu
GPU      ?=
NPROC    ?= 1
TORCHRUN_ARGS ?= --standalone
# NPROC > 1: data-parallel training under torchrun (gloo on CPU, NCCL on GPU); one process otherwise.
# Several machines: TORCHRUN_ARGS="--nnodes=2 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 --rdzv_id=JOB".
TRAINER  = $(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run $(TORCHRUN_ARGS) --nproc_per_node=$(NPROC),$(PY))
TRAIN_ARGS  ?=
EXPORT_ARGS ?=
SERVE_ARGS  ?=
BENCH_ARGS  ?=
COMPARE_ARGS ?=
TARGETS  ?=
SEEDS    ?=
FMNIST   := data/fashion-mnist/train-images-idx3-ubyte.gz
# One stack per venv, named by the requirements file it was installed from ($(VENV)/.installed-<file>), and
# every later target keeps it: a GPU venv stays one without GPU=1. GPU=1 installs the CUDA stack the NVIDIA
# driver runs (scripts/gpu_stack.py chooses, or stops with the reason); GPU=0 goes back to requirements.txt.
# A GPU stack holds onnxruntime-gpu INSTEAD of onnxruntime: the other build is removed first, the two collide.
HELD_REQUIREMENTS := $(patsubst $(VENV)/.installed-%,%.txt,$(firstword $(wildcard $(VENV)/.installed-requirements*)))
WANT_GPU := $(or $(GPU),$(if $(HELD_REQUIREMENTS),,$(if $(wildcard $(VENV)/.installed-gpu),1)))
ifeq ($(WANT_GPU),)
REQUIREMENTS := $(or $(HELD_REQUIREMENTS),requirements.txt)
else ifeq ($(WANT_GPU),0)
REQUIREMENTS := requirements.txt
else
REQUIREMENTS := $(shell $(PYTHON) scripts/gpu_stack.py --python $(if $(wildcard $(PY)),$(PY),$(PYTHON)) --venv $(VENV))
ifeq ($(REQUIREMENTS),)
$(error no GPU stack for this machine, see the gpu_stack line above)
endif
endif
CPU_STACK := $(filter requirements.txt,$(REQUIREMENTS))
STAMP     := $(VENV)/.installed-$(REQUIREMENTS:.txt=)
OTHER_ORT := $(if $(CPU_STACK),onnxruntime-gpu,onnxruntime)

.PHONY: all venv data train export serve test bench compare results clean
all: train export serve

$(STAMP): requirements-common.txt $(if $(CPU_STACK),,requirements-gpu.txt) $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77"  # setuptools: builds the wheel (pyproject.toml)
	! $(PY) -m pip show -q $(OTHER_ORT) 2>/dev/null || $(PY) -m pip uninstall -q -y onnxruntime onnxruntime-gpu
	$(PY) -m pip install -q -r $(REQUIREMENTS)
	$(PY) -m serving.perf_analyzer --install || echo "perf_analyzer not installed: serving probes run without it"
	rm -f $(VENV)/.installed $(VENV)/.installed-gpu $(VENV)/.installed-requirements*
	touch $@

venv: $(STAMP)

$(FMNIST):
	scripts/get_fmnist.sh data/fashion-mnist

data: $(FMNIST)

# The run, then its dense reference (same data, model and budget, no gates) when configs/<run>_dense.yaml
# exists. A run folder that already holds a checkpoint is resumed (a finished run is only re-summarised).
DENSE_CONFIG ?= $(wildcard configs/$(RUN)_dense.yaml)
resume_flag = $(if $(wildcard runs/$(1)/checkpoint.pt),--resume)
train: venv data
	$(TRAINER) -m training --config $(CONFIG) $(call resume_flag,$(RUN)) $(TRAIN_ARGS)
	$(if $(DENSE_CONFIG),$(TRAINER) -m training --config $(DENSE_CONFIG) $(call resume_flag,$(RUN)_dense) $(TRAIN_ARGS))

export: venv
	$(PY) -m export --run $(RUN_DIR) --target $(TARGET) --repository $(REPO) \
	  $(if $(wildcard $(RUN_DIR)_dense/metrics.json),--dense-run $(RUN_DIR)_dense) $(EXPORT_ARGS)

serve: venv
	$(PY) -m serving --repository $(REPO) --run $(RUN_DIR) --report-dir $(REPORTS) $(SERVE_ARGS)

bench: venv
	$(PY) -m bench.speedup --run $(RUN_DIR) --out $(REPORTS)/speedup.json $(BENCH_ARGS)
	$(PY) -m bench.train_overhead --config $(CONFIG) --out $(REPORTS)/train_overhead.json $(BENCH_ARGS)

# dense, polarized, three Torch-Pruning recipes, activation density and FlipOut on one budget (ResNet-20 with
# projection shortcuts), polarized and Torch-Pruning at every kept-FLOPs target (TARGETS=0.3,0.5,0.7 by
# default), per seed (SEEDS=0 by default; SEEDS=0,1,2 JOBS=3 for a spread, seeds side by side; docs/compare.md
# gives the time): reports/compare/compare.{json,md,png}
$(VENV)/.installed-bench: requirements-bench.txt | venv
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $@

compare: venv data $(VENV)/.installed-bench
	OMP_WAIT_POLICY=PASSIVE $(PY) -m bench.compare $(if $(TARGETS),--targets $(TARGETS)) \
	  $(if $(SEEDS),--seeds $(SEEDS)) $(if $(JOBS),--jobs $(JOBS)) $(COMPARE_ARGS)

# README numbers: copy the run's figures (with the command, commit, date and machine that made them) into
# docs/results/, then regenerate the README's result tables from them. tests/test_readme_results.py checks.
results: venv
	$(PY) -m scripts.collect_results --run $(RUN)
	$(PY) -m scripts.render_readme

# PASSIVE: OpenMP threads that spin while waiting made torch 10x slower whenever anything else ran.
test: venv data $(VENV)/.installed-bench
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q tests

clean:
	rm -rf runs reports $(REPO)/*/
