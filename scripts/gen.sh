#!/usr/bin/env bash
# Generate Python stubs (messages, gRPC, mypy types) from proto/ into gen/python.
# With --check, generate into a temporary folder and fail if the committed stubs differ.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
out=gen/python
check=0
[ "${1:-}" = "--check" ] && check=1
if [ $check = 1 ]; then out=$(mktemp -d); trap 'rm -rf "$out"' EXIT; fi
mkdir -p "$out"
$py -m grpc_tools.protoc -Iproto \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  --plugin=protoc-gen-mypy=.venv/bin/protoc-gen-mypy \
  --plugin=protoc-gen-mypy_grpc=.venv/bin/protoc-gen-mypy_grpc \
  proto/coil/v1/*.proto
touch "$out/coil/__init__.py" "$out/coil/v1/__init__.py"
if [ $check = 1 ]; then
  if ! diff -r -q gen/python "$out" -x __pycache__; then
    echo "gen-check: gen/python is stale; run 'make gen' and commit" >&2
    exit 1
  fi
  echo "gen-check: stubs match proto/"
fi
