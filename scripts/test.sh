#!/usr/bin/env bash
# The project's test command (see README; CI runs it through .ci/run): installs what the
# integration tests need (slapd, ldap-utils, openssl, python3; Samba's AD DC packages; NATS) if
# missing, then checks formatting and lints and runs the whole test suite. Runs from any
# working directory.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib.sh
source "$repo/scripts/lib.sh"

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found. Install Rust (https://rustup.rs), then run this again." >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
      rustup component add "$component"
    fi
  done
fi
cg_ensure_packages
cg_ensure_samba
cg_ensure_nats

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
# The suite's own runner goes last: CI reads its closing summary line.
if cargo nextest --version >/dev/null 2>&1; then
  echo "== cargo nextest run --all-targets --no-fail-fast"
  cargo nextest run --all-targets --no-fail-fast
else
  echo "== cargo test --all-targets --no-fail-fast (cargo-nextest not installed)"
  cargo test --all-targets --no-fail-fast
fi
