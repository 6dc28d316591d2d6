#!/usr/bin/env bash
# Run local PostgreSQL + MongoDB-compatible (FerretDB or mongod) servers for development,
# with data kept in .hive/db, until Ctrl-C. Prints (and, with --env-file, writes) the URLs.
#   scripts/start-databases.sh --database tickets --database registry --database orchestrator \
#     --postgres-port 55432 --mongo-port 57017 --env-file .hive/db.env
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PATH:$HOME/.local/bin"  # where install-tools.sh puts uv
exec uv run --all-packages python -m hive_common.localdb "$@"
