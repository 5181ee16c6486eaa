#!/usr/bin/env bash
# A guided tour of coursegate against a throwaway OpenLDAP directory: builds the release binary,
# starts a private slapd loaded with examples/directory.ldif, and runs check, plan, apply, plan
# again, explain and status with the example config, orders (desired/) and course report; then
# shows the groups and the audit log and verifies it. Nothing outside a temporary directory is
# touched; slapd stops when the script ends. Runs from any working directory.
#
#   scripts/demo.sh            # KEEP=1 scripts/demo.sh keeps the work directory for a look
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib.sh
source "$repo/scripts/lib.sh"

if [ -t 1 ]; then
  step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
  step() { printf '\n== %s\n' "$*"; }
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found. Install Rust (https://rustup.rs), then run this again." >&2
  exit 1
fi
cg_ensure_packages

step "cargo build --release"
cargo build --release
bin="$repo/target/release/coursegate"

# The name matters: the AppArmor rule from cg_ensure_packages covers coursegate-slapd-*.
work=$(mktemp -d "${TMPDIR:-/tmp}/coursegate-slapd-demo.XXXXXX")
finish() {
  cg_stop_slapd
  if [ -n "${KEEP:-}" ]; then
    echo "Work directory kept: $work"
  else
    rm -rf "$work"
  fi
}
trap finish EXIT

step "Starting a throwaway slapd with examples/directory.ldif"
cg_start_slapd "$work/slapd" "$repo/examples/directory.ldif"
echo "slapd is at $CG_SLAPD_URL (data in $work/slapd)"

# The example config, pointed at this slapd and at copies of the orders, report and password.
cfg="$work/coursegate.toml"
cp -r "$repo/desired" "$work/desired"
cp "$repo/examples/results.csv" "$repo/examples/ldap-password" "$work/"
chmod 600 "$work/ldap-password" # a secret: coursegate warns when others may read it
cg_write_config "$cfg"
echo "Config: $cfg (examples/coursegate.toml with url, desired_dir, state_dir, audit_log, lms.path rewritten)"

failed=()
# Runs coursegate with the demo config, shows the command and its exit code, never aborts.
coursegate() {
  step "coursegate -c $cfg $*"
  local code=0
  "$bin" -c "$cfg" "$@" || code=$?
  echo "-> exit code $code"
  return "$code"
}

coursegate check || failed+=("check")
coursegate plan || true
coursegate apply || true # 1: something could not be done, 3: revocation brake
coursegate plan || true  # after apply: nothing left to change for the converged orders
coursegate explain anna.andersson || true
coursegate status || true

for group in wim-users pacs-users kardiopacs-users; do
  step "Members of cn=$group (ldapsearch as the directory admin)"
  LDAPNOINIT=1 ldapsearch -x -LLL -o ldif-wrap=no -H "$CG_SLAPD_URL" -D "$CG_ADMIN_DN" \
    -w "$CG_ADMIN_PASSWORD" -b "cn=$group,ou=groups,dc=example,dc=org" -s base member
done

step "The audit log ($work/audit.jsonl)"
if [ -f "$work/audit.jsonl" ]; then
  cat "$work/audit.jsonl"
else
  echo "(no audit log was written)"
  failed+=("audit log")
fi
coursegate audit verify || failed+=("audit verify")

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "Demo finished with problems: ${failed[*]}"
  exit 1
fi
echo "Demo finished."
