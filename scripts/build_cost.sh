#!/usr/bin/env bash
# What a revision costs to build: packages in Cargo.lock, clean release build
# time of the daemon (minimal build: --no-default-features), then its size with
# and without the default features. Each revision is exported with git archive
# and built in its own throwaway target dir under /tmp: never a shared target.
#
#   scripts/build_cost.sh b341fe5 HEAD
#
# Build times are wall-clock: on a shared machine compare them only with the
# load average printed beside them.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(mktemp -d /tmp/build-cost.XXXXXX)
for rev in "$@"; do
  src=$root/$rev/src; tgt=$root/$rev/target
  mkdir -p "$src"
  git archive "$rev" | tar -x -C "$src"
  cd "$src"
  echo "== $rev: $(grep -c '^name = ' Cargo.lock) packages in Cargo.lock; load $(cut -d' ' -f1-3 /proc/loadavg)"
  start=$(date +%s)
  CARGO_TARGET_DIR=$tgt cargo build -q --release --locked --no-default-features --bin aep-s3-rotator
  end=$(date +%s)
  echo "$rev --no-default-features: clean build $((end - start)) s (load after $(cut -d' ' -f1-3 /proc/loadavg)), $(stat -c %s "$tgt/release/aep-s3-rotator") bytes"
  CARGO_TARGET_DIR=$tgt cargo build -q --release --locked --bin aep-s3-rotator
  echo "$rev default features: $(stat -c %s "$tgt/release/aep-s3-rotator") bytes"
  cd - >/dev/null
done
echo "(build dirs left in $root; remove them when done)"
