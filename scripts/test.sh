#!/usr/bin/env bash
# Install everything the test suite needs, from scratch, then run it.
# Used by the README and by .ci/run.  Safe to re-run: installs are idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: promtool/prometheus for the rules tests and the scrape test, kcat for
# the docs' inspection recipes.  Needs root and apt; skipped (tests then skip) otherwise.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  if ! command -v promtool >/dev/null 2>&1 || ! command -v kcat >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus kcat >/dev/null
  fi
fi

python -m pip install -q --disable-pip-version-check -e ".[test,vault,aws,registry,faust]"

# Lint and types first: cheap, and a red lint is a red build.
python -m ruff check streamproc tests benchmarks examples scripts
python -m mypy streamproc

python -m pytest -q -p no:cacheprovider "$@"
