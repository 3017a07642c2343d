#!/usr/bin/env bash
# The test suite, as README.md gives it to new users and as .ci/run runs it.
#
# Prepares a local Python venv with moto (a real, independent STS
# implementation) for the end-to-end test, then runs every test. The moto test
# fails, never skips, when moto cannot start.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
if ! "$venv/bin/moto_server" --help >/dev/null 2>&1; then
  echo "test.sh: installing moto[server] into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]>=5,<6'
fi
export AEP_S3_ROTATOR_MOTO_SERVER="$PWD/$venv/bin/moto_server"

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
