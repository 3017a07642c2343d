#!/usr/bin/env bash
# The test suite, as README.md gives it to new users and as .ci/run runs it.
#
# Prepares a local Python venv with moto (a real, independent implementation of
# STS, S3, IAM and DynamoDB) for the end-to-end tests, then runs every test. The
# moto tests fail, never skip, when moto cannot start.
#
# The venv holds exactly tests/support/requirements.txt (every package pinned).
# It is rebuilt whenever that file changes: the file's hash is stamped into the
# venv, so an old .venv (another checkout's, another moto's) is never trusted
# because moto_server happens to exist in it.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
requirements=tests/support/requirements.txt
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$venv/bin/moto_server" --help >/dev/null 2>&1; then
  echo "test.sh: installing the pinned test tooling ($requirements) into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  # --no-deps: the file lists every package, so nothing unpinned comes along;
  # pip check then proves the list is complete and consistent.
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$requirements"
  "$venv/bin/pip" check --disable-pip-version-check >/dev/null
  echo "$want" >"$stamp"
fi
export AEP_S3_ROTATOR_MOTO_SERVER="$PWD/$venv/bin/moto_server"

if cargo nextest --version >/dev/null 2>&1; then
  # Twice as many tests as cores at once: the black-box tests spend their
  # time waiting on the real daemon's timers (rotations seconds apart, retry
  # backoffs, leases), not on the CPU, so one per core leaves the machine
  # idle (about 96 s instead of 54 s on two loaded cores). --test-threads
  # or NEXTEST_TEST_THREADS still wins.
  export NEXTEST_TEST_THREADS="${NEXTEST_TEST_THREADS:-$(($(nproc) * 2))}"
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
