#!/usr/bin/env bash
# Runs one of the serve tests' Node scripts (tests/serve/*.mjs, Node's built-ins only): skipped
# (77) when Node is not installed, except under CI=true, where that fails.
set -euo pipefail
node=$(command -v node || command -v nodejs || true)
if [[ -z $node ]]; then
  if [[ "${CI:-}" == true ]]; then
    echo "FAIL: node not installed (apt install nodejs; CI=true: required)" >&2
    exit 1
  fi
  echo "SKIP: node not installed (apt install nodejs)" >&2
  exit 77
fi
exec "$node" "$@"
