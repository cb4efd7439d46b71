# Two commands do all the set-up on a fresh machine:
#   make demo   trains a tiny VidRD on built-in synthetic videos and samples long videos (CPU, no downloads)
#   make test   runs the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# XLA:CPU maps each step's temporaries fresh from the kernel under glibc's malloc; this picks
# tcmalloc if installed, else glibc's huge pages (vidrd_jax/host_allocator.py): the demo takes
# 8:23 with tcmalloc, 10:44 with huge pages, 13:19 with neither.
ALLOC_ENV := $(shell python3 -m vidrd_jax.host_allocator 2>/dev/null)

.PHONY: demo test install install-test

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip

$(STAMP): requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements.txt
	# The CLIP BPE vocabulary ships in open_clip's wheel; we read the file, never import the package.
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $@

$(VENV)/.installed-test: requirements-test.txt $(STAMP)
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

install: $(STAMP)
install-test: $(VENV)/.installed-test

demo: $(STAMP)
	env $(ALLOC_ENV) $(PY) -m vidrd_jax.demo --out=demo_out

test: $(VENV)/.installed-test
	env $(ALLOC_ENV) $(PY) -m pytest -q -n 2 --dist=loadfile --durations=15
