#!/usr/bin/env bash
# Generate the Python stubs from proto/ into <out>/src (default: this directory).
# `make gen` writes them in place; `make lint` generates into a temp dir and diffs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$here}
buf=${BUF:-$root/node_modules/.bin/buf}
export PATH="$root/.venv/bin:$PATH"
command -v grpc_python_plugin >/dev/null || {
  echo "grpc_python_plugin not found: install Debian's protobuf-compiler-grpc (make install does)" >&2
  exit 1
}
cd "$here"
"$buf" generate --output "$out"
# Regular packages, so imports resolve the same for mypy and at run time.
find "$out/src/neuralhive" -type d -exec touch {}/__init__.py \;
touch "$out/src/neuralhive/py.typed"
