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

# Apache Kafka from Maven Central (scripts/kafka/pom.xml) into .cache/kafka/lib: the broker
# the integration suite runs on.  Installs a JDK and Maven with apt-get only if missing;
# a no-op when the cached copy matches the pom.
bash scripts/kafka/fetch.sh

# Apicurio Registry from Maven Central (a real Confluent-compatible registry for
# tests/integration/test_registry_apicurio.py) into .cache/apicurio; a no-op once there.
bash scripts/apicurio/fetch.sh || echo "scripts/apicurio/fetch.sh failed: the Apicurio tests will skip" >&2

# Lint and types first: cheap, and a red lint is a red build.
python -m ruff check streamproc tests benchmarks examples scripts
python -m mypy streamproc

# Tansu stays the demo's embedded broker: run the demo and a smoke subset on it first (only
# for a full run; arguments select tests of the main run).  Its failure is reported after
# the main run, so the closing line below stays the full suite's.
tansu_rc=0
if [ "$#" -eq 0 ]; then
  streamproc demo --events 50 >/dev/null || tansu_rc=$?
  if [ "$tansu_rc" -eq 0 ]; then
    env -u STREAMPROC_TEST_BOOTSTRAP STREAMPROC_TEST_BROKER=tansu \
      python -m pytest -q -p no:cacheprovider -m tansu_smoke tests/integration || tansu_rc=$?
  fi
fi

# The whole suite; integration tests on Apache Kafka (the default once its jars are
# fetched; STREAMPROC_TEST_BROKER overrides, docs/testing.md).
suite_rc=0
python -m pytest -q -p no:cacheprovider --durations=25 "$@" || suite_rc=$?
if [ "$tansu_rc" -ne 0 ]; then
  echo "Tansu run (streamproc demo / -m tansu_smoke) failed with exit code $tansu_rc" >&2
  [ "$suite_rc" -ne 0 ] || suite_rc=$tansu_rc
fi
exit "$suite_rc"
