# Two entry points (see README): `make run` starts the dashboard, `make test` runs every test.
# Both create ./.venv on first use and reinstall only when pyproject.toml changes.
# --no-cache-dir: no second copy of the ~3.5 GB of torch/CUDA wheels in ~/.cache/pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
KERNEL := $(VENV)/.kernel-$(shell cat bnviz/csrc/probe.cpp bnviz/probe_kernel.py | cksum | cut -d' ' -f1)

.PHONY: run test lint bench browser-deps kernel serve-class

kernel: $(KERNEL)

$(STAMP): pyproject.toml
	@$(PYTHON) scripts/check_disk.py $(VENV)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-cache-dir -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

# The compiled manual-BN check (bnviz/csrc/probe.cpp, ~15 s once per torch version): without
# a C++ compiler bnviz runs the same check with eager torch ops, slower.
$(KERNEL): $(STAMP) bnviz/csrc/probe.cpp bnviz/probe_kernel.py
	@$(BIN)/bnviz build-kernel && rm -f $(VENV)/.kernel-* && touch $@ \
		|| echo "bnviz: continuing with the eager manual-BN check (slower)"

# glibc (Linux): keep freed activation memory for reuse instead of page-faulting a fresh
# block on every forward (faster forwards; the process keeps its peak heap), and one arena
# for all threads, so the background prefetch reuses that heap instead of growing its own
# (numbers in BENCHMARKS.md). Ignored elsewhere. Override with `make run MALLOC_TUNING=`.
MALLOC_TUNING ?= MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
	MALLOC_ARENA_MAX=1

run: $(KERNEL)
	$(MALLOC_TUNING) $(BIN)/streamlit run app.py

# A class: REPLICAS Streamlit processes behind nginx on PORT (installed with apt-get when
# missing), cookie session affinity; ADDRESS=0.0.0.0 lets other machines in. README,
# "Hosting for a class". Ctrl-C stops everything.
REPLICAS ?= 2
PORT     ?= 8501
ADDRESS  ?= 127.0.0.1
serve-class: $(KERNEL)
	$(MALLOC_TUNING) $(BIN)/bnviz serve-class --replicas $(REPLICAS) --port $(PORT) \
		--address $(ADDRESS)

browser-deps:
	@bash scripts/ensure_chromium.sh

test: $(KERNEL) browser-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(KERNEL)
	$(BIN)/python benchmarks/bench_inspect.py
	$(MALLOC_TUNING) $(BIN)/python benchmarks/bench_inspect.py
