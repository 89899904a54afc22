#!/usr/bin/env bash
# The release tarball the RPM specs build from (Source0: helexa-VERSION.tar.gz, unpacked
# into helexa-VERSION/): every committed file of REF (default HEAD), nothing else.
#   scripts/release-tarball.sh [DEST_DIR] [REF]     DEST_DIR default: ~/rpmbuild/SOURCES
# then: rpmbuild -ba packaging/rpm/cortex.spec; rpmbuild -ba packaging/rpm/helexa-neuron.spec
set -euo pipefail
cd "$(dirname "$0")/.."

dest=${1:-$HOME/rpmbuild/SOURCES}
ref=${2:-HEAD}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
spec_version=$(sed -n 's/^Version: *//p' packaging/rpm/cortex.spec)
if [ "$version" != "$spec_version" ]; then
  echo "pyproject.toml says $version but packaging/rpm/cortex.spec says $spec_version" >&2
  exit 1
fi
mkdir -p "$dest"
out="$dest/helexa-$version.tar.gz"
git archive --format=tar.gz --prefix="helexa-$version/" -o "$out" "$ref"
echo "$out"
