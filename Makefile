# Two commands do everything on a fresh machine:
#   make demo   materializes the whole asset graph on the embedded defaults
#   make test   runs the test suite
#   make test-fast  the tests without multi-process training, UI servers or a Spark cluster (~2 minutes)
#   make lint       ruff lint + format check (part of make test)
# Both create (or update) this clone's .venv from uv.lock via scripts/bootstrap.sh (uv sync --locked: a stale
# lock fails). RECSYS_VARIANT=cuda selects the CUDA fbgemm kernels for GPU machines.
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c

ROOT := $(CURDIR)
STATE ?= $(ROOT)/.recsys_state
export RECSYS_STATE_DIR ?= $(STATE)
export DAGSTER_HOME ?= $(STATE)/dagster_home
export MLFLOW_TRACKING_URI ?= sqlite:///$(STATE)/mlflow/mlflow.db
# Spark workers must run the venv's interpreter (set per command below).
DEMO_CONFIG ?= $(ROOT)/recsys_assets/configs/demo.yaml
PYTEST_ARGS ?=

.PHONY: env demo test test-fast lint format ci-materialize ui serve benchmarks clean-state

env:
	@bash scripts/bootstrap.sh >/dev/null

define venv
$$(bash scripts/bootstrap.sh)
endef

# The persistent instance: run retries, the one-at-a-time training pool (recsys_assets/defs/automation.py).
define instance
mkdir -p $(DAGSTER_HOME) $(STATE)/mlflow
$$VENV/bin/python -c "from recsys_assets.defs.automation import write_dagster_yaml; write_dagster_yaml('$(DAGSTER_HOME)')"
endef

demo:
	VENV=$(venv)
	export PYSPARK_PYTHON=$$VENV/bin/python PATH=$$VENV/bin:$$PATH
	$(instance)
	$$VENV/bin/dagster asset materialize -m recsys_assets.definitions --select '*' -c $(DEMO_CONFIG)
	$$VENV/bin/python -m recsys_assets.cli status

test:
	VENV=$(venv)
	export PYSPARK_PYTHON=$$VENV/bin/python PATH=$$VENV/bin:$$PATH
	$(MAKE) --no-print-directory lint
	$$VENV/bin/dg check defs  # the defs folder loads ([tool.dg] in pyproject.toml)
	bash scripts/install_browser.sh || true  # chromium for test_ui_browser.py; never fails the tests
	$$VENV/bin/python -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory ci-materialize

# No multi-process training and no Spark cluster: the tier to run while editing.
test-fast:
	VENV=$(venv)
	export PYSPARK_PYTHON=$$VENV/bin/python PATH=$$VENV/bin:$$PATH
	$$VENV/bin/python -m pytest -m "not multiprocess and not spark_cluster" $(PYTEST_ARGS)

lint:
	VENV=$(venv)
	$$VENV/bin/ruff check .
	$$VENV/bin/ruff format --check .

format:
	VENV=$(venv)
	$$VENV/bin/ruff check --fix .
	$$VENV/bin/ruff format .

# "dagster asset materialize in CI": the whole graph on the demo config, against a fresh instance and state
# folder (deleted afterwards), then the evaluation asset must carry its metrics.
CI_REQUIRED := evaluation:two_stage_hr@10,two_stage_ndcg@10,two_tower_hr@10,two_tower_ndcg@10,mostpopular_ndcg@10,lastitemmarkov_ndcg@10,ease_ndcg@10,spark_als_ndcg@10
# the online funnel: its answers compared with the batch list (a mismatch makes the difference infinite)
CI_SERVING_REQUIRED := two_stage_model:parity_identical,parity_max_score_diff
ci-materialize:
	VENV=$(venv)
	CI_STATE=$$(mktemp -d /tmp/recsys-ci-XXXXXX)
	trap 'rm -rf "$$CI_STATE"' EXIT
	export PYSPARK_PYTHON=$$VENV/bin/python PATH=$$VENV/bin:$$PATH RECSYS_STATE_DIR=$$CI_STATE
	export DAGSTER_HOME=$$CI_STATE/dagster_home MLFLOW_TRACKING_URI=sqlite:///$$CI_STATE/mlflow/mlflow.db
	mkdir -p $$DAGSTER_HOME $$CI_STATE/mlflow
	$$VENV/bin/python -c "from recsys_assets.defs.automation import write_dagster_yaml; write_dagster_yaml('$$DAGSTER_HOME')"
	$$VENV/bin/dagster asset materialize -m recsys_assets.definitions --select '*' -c $(DEMO_CONFIG)
	$$VENV/bin/python -m recsys_assets.cli status --require $(CI_REQUIRED) --require $(CI_SERVING_REQUIRED)

# Both servers on 127.0.0.1; Ctrl-C or SIGTERM stops both and every helper process (recsys_assets/ui.py).
UI_PORT ?= 3000
MLFLOW_UI_PORT ?= 5000
ui:
	VENV=$(venv)
	export PYSPARK_PYTHON=$$VENV/bin/python PATH=$$VENV/bin:$$PATH
	$(instance)
	exec $$VENV/bin/python -m recsys_assets.ui --dagster-port $(UI_PORT) --mlflow-port $(MLFLOW_UI_PORT) \
		--tracking-uri $(MLFLOW_TRACKING_URI) --workspace workspace.yaml

# The champion funnel online: MLflow's scoring server for models:/recsys_two_stage@champion (registered by the
# two_stage_model asset, e.g. by `make demo`) on 127.0.0.1. README "Online recommendations" shows a request.
# Two workers of one torch thread each: the fastest on 2 cores in benchmarks/serving.py.
SERVE_PORT ?= 5001
SERVE_WORKERS ?= 2
serve:
	VENV=$(venv)
	export PATH=$$VENV/bin:$$PATH OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}  # the scoring server execs uvicorn
	exec $$VENV/bin/mlflow models serve -m models:/recsys_two_stage@champion --env-manager local \
		--host 127.0.0.1 --port $(SERVE_PORT) --workers $(SERVE_WORKERS)

benchmarks:
	VENV=$(venv)
	export PYSPARK_PYTHON=$$VENV/bin/python PATH=$$VENV/bin:$$PATH
	for b in benchmarks/*.py; do echo "== $$b"; $$VENV/bin/python $$b; done

clean-state:
	rm -rf $(STATE)
