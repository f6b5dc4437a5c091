# The two commands: `make run` starts the system, `make test` proves it.
# Configuration comes from the environment (see README); an `.env` file is read if present.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)

ifneq (,$(wildcard .env))
include .env
export
endif

.PHONY: install run server worker beat flower migrate redis registration bootstrap bench test test-postgresql test-sqlite soak lint clean

install: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $@

redis: install
	@PYTHON=$(PY) scripts/ensure-redis

migrate: install
	$(PY) -m alembic upgrade head

# The default layout in the foreground (run.py): the HTTP server, an events worker, a
# fetch worker and beat. Ctrl-C (or SIGTERM) stops them all within 10 s; if one dies, the
# others are stopped and it says which.
run: install redis migrate
	$(PY) run.py

server: install redis
	$(PY) server.py

registration: install
	@$(PY) -m directory registration

# Load every room the homeserver is already in (README: "Installing on an existing
# homeserver"); needs ADMIN_TOKEN, or BOOTSTRAP_ARGS="--users-file users.txt".
bootstrap: install redis migrate
	$(PY) -m directory bootstrap $(BOOTSTRAP_ARGS)

worker: install redis
	$(PY) worker.py

beat: install redis
	$(PY) beat.py

flower: install redis
	$(PY) -m celery -A tasks.app flower --address=$${FLOWER_HOST:-127.0.0.1} --port=$${FLOWER_PORT:-5555} \
		$${FLOWER_BASIC_AUTH:+--basic-auth=$$FLOWER_BASIC_AUTH}

# Benchmarks (bench/README.md): PostgreSQL on 127.0.0.1:5432, its own redis-server.
# Sizes as flags, e.g. `make bench BENCH_ARGS=--quick`. Writes bench/results.json and .png.
bench: install
	@command -v redis-server >/dev/null || PYTHON=$(PY) scripts/ensure-redis
	$(PY) -m pip install -q matplotlib==3.11.2
	$(PY) -m bench $(BENCH_ARGS)

# The suite on PostgreSQL (the production target), then on SQLite (the embedded default).
test: install
	@command -v redis-server >/dev/null || PYTHON=$(PY) scripts/ensure-redis
	@if $(PY) -c "import psycopg; psycopg.connect('host=127.0.0.1 port=5432 user=postgres dbname=postgres', connect_timeout=3).close()" 2>/dev/null; then \
		$(MAKE) --no-print-directory test-postgresql test-sqlite; \
	else \
		echo "PostgreSQL does not answer on 127.0.0.1:5432: running the suite on SQLite only"; \
		$(MAKE) --no-print-directory test-sqlite; \
	fi

test-postgresql: install
	DIRECTORY_TEST_DB=postgresql $(PY) -m pytest -q -m "not soak" $(PYTEST_ARGS)

test-sqlite: install
	DIRECTORY_TEST_DB=sqlite $(PY) -m pytest -q -m "not soak" $(PYTEST_ARGS)

# The long fault runs (tests/faults/test_soak.py): real processes on a PostgreSQL and a
# Redis of their own, killed and restarted mid-run. CI runs it after `make test`.
soak: install
	@command -v redis-server >/dev/null || PYTHON=$(PY) scripts/ensure-redis
	DIRECTORY_TEST_DB=postgresql $(PY) -m pytest -q -s -m soak $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .venv-synapse var .pytest_cache .ruff_cache
