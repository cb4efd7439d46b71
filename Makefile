# Two commands do all the set-up on a fresh machine:
#   make demo   trains a tiny VidRD on built-in synthetic videos and samples long videos (CPU, no downloads)
#   make test   runs the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ALLOCATOR := $(VENV)/.host-allocator
# XLA:CPU maps each step's temporaries fresh from the kernel under glibc's malloc. The demo and
# the tests run under tcmalloc instead, fetched into the venv without root on Debian/Ubuntu,
# else under glibc's huge pages (vidrd_jax/host_allocator.py): the demo takes 8:23 with
# tcmalloc, 10:44 with huge pages, 13:19 with neither. Read when the recipe runs (after the fetch).
ALLOC_ENV = $$($(PY) -m vidrd_jax.host_allocator 2>/dev/null)

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

# Never fails: without tcmalloc the runs fall back to huge pages, and say so.
$(ALLOCATOR): vidrd_jax/host_allocator.py | $(VENV)/bin/python
	$(PY) -m vidrd_jax.host_allocator --fetch
	touch $@

install: $(STAMP) $(ALLOCATOR)
install-test: $(VENV)/.installed-test $(ALLOCATOR)

demo: $(STAMP) $(ALLOCATOR)
	env $(ALLOC_ENV) $(PY) -m vidrd_jax.demo --out=demo_out

test: $(VENV)/.installed-test $(ALLOCATOR)
	env $(ALLOC_ENV) $(PY) -m pytest -q -n 2 --dist=loadfile --durations=15
