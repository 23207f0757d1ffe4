#!/usr/bin/env bash
# Fetch Apicurio Registry (a Confluent-compatible schema registry, /apis/ccompat/v7) from
# Maven Central into .cache/apicurio (or $STREAMPROC_APICURIO_HOME), for the registry
# integration tests (tests/integration/test_registry_apicurio.py).
#
# Pinned: io.apicurio:apicurio-registry-app:3.0.9, classifier "all" (tar.gz: the Quarkus
# runner jar and its lib/).  3.0.x is the newest line that runs on Java 17 (3.3 needs 21).
# Only Maven Central is used (scripts/kafka/settings.xml-style mirror of everything).
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=3.0.9
DEST="${STREAMPROC_APICURIO_HOME:-.cache/apicurio}"
if [[ -f "$DEST/.complete-$VERSION" ]]; then
  echo "apicurio $VERSION already in $DEST"
  exit 0
fi
command -v mvn >/dev/null || { echo "mvn not found (apt-get install -y maven)" >&2; exit 1; }
rm -rf "$DEST" && mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
SETTINGS="$PWD/scripts/apicurio/settings.xml"
WORK="$(mktemp -d)"  # without a pom, the plugin writes its markers under the working dir
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && mvn -q -B -Dstyle.color=never -s "$SETTINGS" dependency:unpack \
  -Dartifact="io.apicurio:apicurio-registry-app:${VERSION}:tar.gz:all" \
  -DoutputDirectory="$DEST")
test -f "$DEST/apicurio-registry-app-${VERSION}-runner.jar"
touch "$DEST/.complete-$VERSION"
echo "apicurio $VERSION fetched into $DEST"
