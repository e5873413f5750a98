#!/usr/bin/env bash
# Prepares the @neondatabase/serverless and Prisma tests: `npm ci` from the lockfile and
# `prisma generate` into $SLUICE_CACHE/compat/neon (once per lockfile), then copies the
# test files there (every run: node resolves packages next to the script it runs).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${SLUICE_CACHE:-$HOME/.cache/sluice}/compat/neon
mkdir -p "$dir"
stamp="$dir/ready-$(cat "$here/package-lock.json" "$here/prisma/schema.prisma" | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  rm -rf "$dir/node_modules" "$dir/generated" "$dir"/ready-*
  cp "$here/package.json" "$here/package-lock.json" "$here/prisma.config.ts" "$dir/"
  mkdir -p "$dir/prisma" && cp "$here/prisma/schema.prisma" "$dir/prisma/"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  # The generated client needs no engine binary; the CLI still looks for the schema
  # engine (downloaded from binaries.prisma.sh, which the build machines cannot
  # reach), though generate never runs it.
  (cd "$dir" && PRISMA_SCHEMA_ENGINE_BINARY=/bin/true npx prisma generate >/dev/null)
  touch "$stamp"
  echo "neon compat packages ready in $dir"
fi
cp "$here"/*.test.mjs "$here"/*.test.ts "$dir/"
