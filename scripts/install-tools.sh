#!/usr/bin/env bash
# Install everything Hive Flow C needs on a fresh Debian machine; safe to run again.
#
#   uv (from PyPI) · Node build tools (npm ci: buf) · grpc_python_plugin (make gen) ·
#   PostgreSQL server binaries (if initdb is absent) · FerretDB v1.24.2 (MongoDB-compatible,
#   for tests and `make dev`, unless mongod is installed) · the Python workspace (uv sync).
#
# Only package registries are used (PyPI, npm, Debian, the Go module proxy): no downloads of
# prebuilt binaries. Root is used directly; otherwise sudo.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FERRETDB_VERSION="v1.24.2"
FERRETDB_BIN="${HIVE_FERRETDB_BIN:-$HOME/.cache/hive/bin/ferretdb}"

log() { printf '\033[1;34m[install-tools]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[install-tools] error:\033[0m %s\n' "$*" >&2; exit 1; }

if [[ "$(id -u)" -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found; install these by hand: $*"
  if [[ "$APT_UPDATED" -eq 0 ]]; then
    log "apt-get update"
    "${SUDO[@]}" apt-get update -qq
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# Tools installed with --user land here; go may live in /usr/local/go.
CALLER_PATH="$PATH"
export PATH="$HOME/.local/bin:$PATH"
if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
  export PATH="$PATH:/usr/local/go/bin"
fi

# --- basic tools -------------------------------------------------------------------------
missing=()
command -v make >/dev/null || missing+=(make)
command -v git >/dev/null || missing+=(git)
command -v npm >/dev/null || missing+=(nodejs npm)
command -v grpc_python_plugin >/dev/null || missing+=(protobuf-compiler-grpc)
command -v setpriv >/dev/null || missing+=(util-linux)
if [[ ${#missing[@]} -gt 0 ]]; then apt_install "${missing[@]}"; fi

# --- uv -----------------------------------------------------------------------------------
if ! command -v uv >/dev/null; then
  log "installing uv from PyPI"
  # Debian marks its Python as externally managed; a --user install of one tool is fine.
  python3 -m pip install --user --quiet uv \
    || python3 -m pip install --user --quiet --break-system-packages uv \
    || die "could not install uv with pip"
fi
command -v uv >/dev/null || die "uv installed but not on PATH (expected in ~/.local/bin)"
log "uv: $(uv --version)"

# --- PostgreSQL server binaries -----------------------------------------------------------
have_initdb() {
  command -v initdb >/dev/null && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
if ! have_initdb; then
  # The tests and `make dev` run their own clusters: do not let Debian create and start one.
  "${SUDO[@]}" mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" \
    | "${SUDO[@]}" tee /etc/postgresql-common/createcluster.d/hive.conf >/dev/null
  apt_install postgresql
fi
have_initdb || die "PostgreSQL server binaries still missing after installing postgresql"
log "PostgreSQL: $(compgen -G '/usr/lib/postgresql/*/bin/initdb' | tail -1 || command -v initdb)"

# --- FerretDB (MongoDB-compatible server) -------------------------------------------------
ferretdb_ok() {
  [[ -x "$FERRETDB_BIN" ]] || return 1
  local reported
  reported="$("$FERRETDB_BIN" --version 2>/dev/null)" || return 1
  [[ "$reported" == *"version: $FERRETDB_VERSION"* ]]
}
if command -v mongod >/dev/null; then
  log "mongod found on PATH; FerretDB not needed"
elif ferretdb_ok; then
  log "FerretDB $FERRETDB_VERSION already at $FERRETDB_BIN"
else
  if ! command -v go >/dev/null; then apt_install golang-go; fi
  command -v go >/dev/null || die "Go is needed to build FerretDB and could not be installed"
  log "building FerretDB $FERRETDB_VERSION with $(go version) (about a minute)"
  # `go install ...@v1.24.2` yields a binary that panics at start: the module ships an empty
  # build/version/version.txt that its release process normally fills in. Build from a
  # writable copy of the module with the version written in.
  export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  module_dir="$(cd "$work" && go mod download -json "github.com/FerretDB/FerretDB@$FERRETDB_VERSION" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')"
  [[ -d "$module_dir" ]] || die "go mod download gave no module directory"
  cp -r "$module_dir/." "$work/ferretdb"
  chmod -R u+w "$work/ferretdb"
  echo "$FERRETDB_VERSION" >"$work/ferretdb/build/version/version.txt"
  mkdir -p "$(dirname "$FERRETDB_BIN")"
  (cd "$work/ferretdb" && CGO_ENABLED=0 go build -buildvcs=false -o "$FERRETDB_BIN.tmp" ./cmd/ferretdb)
  mv "$FERRETDB_BIN.tmp" "$FERRETDB_BIN"
  rm -rf "$work"
  trap - EXIT
  ferretdb_ok || die "built FerretDB does not report $FERRETDB_VERSION: $("$FERRETDB_BIN" --version 2>&1 | head -3)"
  log "FerretDB $FERRETDB_VERSION installed at $FERRETDB_BIN"
fi

# --- Node build tools (buf) ---------------------------------------------------------------
cd "$REPO_ROOT"
# npm ci wipes node_modules first, so skip it while the installed tree is newer than the lock.
if [[ -x node_modules/.bin/buf && node_modules/.package-lock.json -nt package-lock.json ]]; then
  log "node_modules up to date"
else
  log "npm ci (buf)"
  npm ci --no-audit --no-fund --loglevel=error
fi

# --- Python workspace ---------------------------------------------------------------------
log "uv sync --all-packages --frozen"
uv sync --all-packages --frozen

log "done"
if ! PATH="$CALLER_PATH" command -v uv >/dev/null; then
  # make finds uv there by itself; a shell (uv run hive ...) needs it on its PATH.
  log "uv is in $HOME/.local/bin, which is not on your PATH: add"
  log "  export PATH=\"\$HOME/.local/bin:\$PATH\""
  log "to your shell profile (e.g. ~/.bashrc), and run it in this shell"
fi
