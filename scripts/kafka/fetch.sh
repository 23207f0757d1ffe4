#!/usr/bin/env bash
# Fetch the pinned Apache Kafka broker (scripts/kafka/pom.xml) from Maven Central into
# .cache/kafka/lib (or $STREAMPROC_KAFKA_LIBS), for streamproc.devkafka.KafkaBroker.
#
# Idempotent: does nothing when the folder holds a complete copy for this very pom (a
# stamp file holds the pom's SHA-256, written only after every jar was copied).  Installs
# a JDK and Maven with apt-get only when `java`/`mvn` are missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

pom=scripts/kafka/pom.xml
dest=${STREAMPROC_KAFKA_LIBS:-.cache/kafka/lib}
stamp=$(sha256sum "$pom" | cut -d' ' -f1)
if [ -f "$dest/.complete" ] && [ "$(cat "$dest/.complete")" = "$stamp" ]; then
  exit 0
fi

if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      default-jdk-headless maven >/dev/null
  else
    echo "fetch.sh: need java and mvn (apt-get install default-jdk-headless maven)" >&2
    exit 1
  fi
fi

echo "fetching Apache Kafka from Maven Central into $dest" >&2
tmp="$dest.partial"
rm -rf "$tmp"
mkdir -p "$tmp"
mvn -q -B -Dstyle.color=never -s scripts/kafka/settings.xml -f "$pom" dependency:copy-dependencies \
  -DincludeScope=runtime -DoutputDirectory="$(cd "$tmp" && pwd)"
echo "$stamp" >"$tmp/.complete"
rm -rf "$dest"
mv "$tmp" "$dest"
