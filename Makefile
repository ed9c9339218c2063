# The README's commands. `make digits` trains the bundled default and writes samples; `make digits-text` trains the
# bundled text-to-image default and prints its alignment (seen and held-out captions, beside real compositions');
# `make test` runs the tests.
# Both create the virtual environment .venv on first use. The tests also install libtpu (the `tpu` extra) so
# that TPU programs and Pallas TPU kernels compile ahead of time on this CPU; JAX itself still runs on the CPU.
PYTHON ?= python3
VENV := .venv
WORKDIR ?= runs/digits
TEXT_WORKDIR ?= runs/digits_text
export JAX_PLATFORMS ?= cpu

.PHONY: digits digits-text test test-browser venv

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

$(VENV)/.installed-tpu: $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[test,tpu]'
	touch $@

venv: $(VENV)/.installed

digits: $(VENV)/.installed
	$(VENV)/bin/python -m flowar_jax train --config configs/digits.py --workdir $(WORKDIR)

digits-text: $(VENV)/.installed
	$(VENV)/bin/python -m flowar_jax train --config configs/digits_text.py --workdir $(TEXT_WORKDIR)
	$(VENV)/bin/python -m flowar_jax evaluate --workdir $(TEXT_WORKDIR) --metrics alignment

test: $(VENV)/.installed-tpu
	$(VENV)/bin/python -m pytest tests -q -n 2 --durations=10

# The demo's headless-browser test (tests/test_serve.py skips it without chromium): installs Debian's chromium
# (about 130 packages, 330 MB; root), then runs the serve tests.
test-browser: $(VENV)/.installed
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	$(VENV)/bin/python -m pytest tests/test_serve.py -q
