#!/usr/bin/env bash
# Benchmark: one reconcile of N orders (default 20,000) against a throwaway slapd. Measures wall
# time and the number of LDAP operations coursegate issued for: the first apply (N grants), a plan
# right after it (no changes), and withdrawing every order (N revocations, let through with
# --allow-revocations). Prints a Markdown table for BENCHMARKS.md. Not part of the test suite.
#
#   scripts/bench.sh [N]
set -euo pipefail

n=${1:-20000}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib.sh
source "$repo/scripts/lib.sh"
cg_ensure_packages
cargo build --release --quiet
bin="$repo/target/release/coursegate"

work=$(mktemp -d "${TMPDIR:-/tmp}/coursegate-slapd-bench.XXXXXX")
finish() {
  cg_stop_slapd
  rm -rf "$work"
}
trap finish EXIT

# Directory: the example base entries plus N people.
{
  cat "$repo/examples/directory.ldif"
  for ((i = 0; i < n; i++)); do
    printf '\ndn: uid=bench%06d,ou=people,dc=example,dc=org\nobjectClass: inetOrgPerson\nuid: bench%06d\ncn: Bench %d\nsn: Bench\n' "$i" "$i" "$i"
  done
} >"$work/directory.ldif"
cg_start_slapd "$work/slapd" "$work/directory.ldif"

mkdir -p "$work/desired"
{
  echo "Username;Course;Passed;Date"
  for ((i = 0; i < n; i++)); do
    printf 'bench%06d;Wim grundkurs;true;2026-11-01\n' "$i"
  done
} >"$work/results.csv"
for ((i = 0; i < n; i++)); do
  printf 'id = "B-%06d"\nuser = "bench%06d"\naccess = ["wim"]\nordered_by = "karin.chef"\n' "$i" "$i" >"$work/desired/B-$i.toml"
done
cp "$repo/examples/ldap-password" "$work/"
chmod 600 "$work/ldap-password"
cg_write_config "$work/coursegate.toml"

measure() { # label, args...
  local label=$1
  shift
  local start end code=0
  start=$(date +%s.%N)
  "$bin" -c "$work/coursegate.toml" "$@" >"$work/out" 2>"$work/err" || code=$?
  end=$(date +%s.%N)
  local ops
  ops=$(grep -o 'ldap_operations=[0-9]*' "$work/err" | tail -1 | cut -d= -f2 || true)
  printf '| %s | %s | %.2f s | %s | %s |\n' "$label" "$*" "$(echo "$end - $start" | bc)" "${ops:--}" "$code"
}

echo "Orders: $n, machine: $(nproc) cores, $(date -u +%Y-%m-%d)"
echo
echo "| step | command | wall time | LDAP operations | exit |"
echo "|---|---|---|---|---|"
measure "first apply: $n grants" apply
members=$(LDAPNOINIT=1 ldapsearch -x -LLL -o ldif-wrap=no -H "$CG_SLAPD_URL" -D "$CG_ADMIN_DN" \
  -w "$CG_ADMIN_PASSWORD" -b "cn=wim-users,ou=groups,dc=example,dc=org" -s base member | grep -c '^member')
measure "plan right after (expects no changes)" plan
grep -q "No changes." "$work/out" || { echo "plan after apply was not empty" >&2; exit 1; }
measure "second apply (idempotent)" apply
rm -f "$work"/desired/*.toml
measure "withdraw all: $n revocations" apply --allow-revocations "$n"
after=$(LDAPNOINIT=1 ldapsearch -x -LLL -o ldif-wrap=no -H "$CG_SLAPD_URL" -D "$CG_ADMIN_DN" \
  -w "$CG_ADMIN_PASSWORD" -b "cn=wim-users,ou=groups,dc=example,dc=org" -s base member | grep -c '^member')
measure "audit verify ($((2 * n)) records)" audit verify
echo
echo "wim-users members after the first apply: $members (incl. placeholder and the demo's); after withdrawal: $after"
