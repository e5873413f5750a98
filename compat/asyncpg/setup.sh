#!/usr/bin/env bash
# Prepares asyncpg's test suite for `make compat`: a venv with the pinned asyncpg wheel
# (hash-checked) and the suite's tests/ from the pinned sdist, both under
# $SLUICE_CACHE/compat. Prints nothing when it is ready already.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${SLUICE_CACHE:-$HOME/.cache/sluice}/compat
python=${PYTHON:-python3}
mkdir -p "$cache"
stamp="$cache/ready-$(cat "$here/requirements.lock" "$here/sdist.lock" | sha256sum | cut -c1-16)"
[[ -f "$stamp" ]] && exit 0
rm -rf "$cache/venv" "$cache/src" "$cache"/ready-*
"$python" -m venv "$cache/venv"
"$cache/venv/bin/pip" install -q --disable-pip-version-check --require-hashes \
    --only-binary :all: -r "$here/requirements.lock"
mkdir -p "$cache/src"
"$cache/venv/bin/pip" download -q --disable-pip-version-check --require-hashes --no-deps \
    --no-binary :all: -r "$here/sdist.lock" -d "$cache/src"
tar -xzf "$cache"/src/asyncpg-*.tar.gz -C "$cache/src"
rm -rf "$cache/tests"
cp -r "$cache"/src/asyncpg-*/tests "$cache/tests"
touch "$stamp"
echo "asyncpg suite ready in $cache"
