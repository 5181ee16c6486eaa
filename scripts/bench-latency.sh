#!/usr/bin/env bash
# Benchmark (issue 3): latency from an order file's rename into desired_dir to the membership
# being visible in LDAP, with the daemon running and N orders (default 10,000) already loaded.
# Drops D orders (default 100) one after another and prints p50, p99 and max. Not part of the
# test suite; results go into BENCHMARKS.md.
#
#   scripts/bench-latency.sh [N] [D]
set -euo pipefail

n=${1:-10000}
drops=${2:-100}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib.sh
source "$repo/scripts/lib.sh"
cg_ensure_packages
cargo build --release --quiet
bin="$repo/target/release/coursegate"

work=$(mktemp -d "${TMPDIR:-/tmp}/coursegate-slapd-latency.XXXXXX")
daemon_pid=""
finish() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  cg_stop_slapd
  if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap finish EXIT

total=$((n + drops))
{
  cat "$repo/examples/directory.ldif"
  for ((i = 0; i < total; i++)); do
    printf '\ndn: uid=lat%06d,ou=people,dc=example,dc=org\nobjectClass: inetOrgPerson\nuid: lat%06d\ncn: Lat %d\nsn: Lat\n' "$i" "$i" "$i"
  done
} >"$work/directory.ldif"
cg_start_slapd "$work/slapd" "$work/directory.ldif"

mkdir -p "$work/desired"
{
  echo "Username;Course;Passed;Date"
  for ((i = 0; i < total; i++)); do printf 'lat%06d;Wim grundkurs;true;2026-11-01\n' "$i"; done
} >"$work/results.csv"
for ((i = 0; i < n; i++)); do
  printf 'id = "L-%06d"\nuser = "lat%06d"\naccess = ["wim"]\nordered_by = "karin.chef"\n' "$i" "$i" >"$work/desired/L-$i.toml"
done
cp "$repo/examples/ldap-password" "$work/"
chmod 600 "$work/ldap-password"
cg_write_config "$work/coursegate.toml"

RUST_LOG=${RUST_LOG:-warn} "$bin" -c "$work/coursegate.toml" run 2>"$work/daemon.log" &
daemon_pid=$!

export CG_SLAPD_URL CG_ADMIN_DN CG_ADMIN_PASSWORD
python3 - "$work" "$n" "$drops" <<'PY'
import os, subprocess, sys, time

work, n, drops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
url, admin, pw = os.environ["CG_SLAPD_URL"], os.environ["CG_ADMIN_DN"], os.environ["CG_ADMIN_PASSWORD"]
group = "cn=wim-users,ou=groups,dc=example,dc=org"
env = dict(os.environ, LDAPNOINIT="1")

def is_member(dn):
    out = subprocess.run(
        ["ldapsearch", "-x", "-LLL", "-H", url, "-D", admin, "-w", pw, "-b", group, "-s", "base",
         f"(member={dn})", "1.1"], capture_output=True, text=True, env=env)
    return out.stdout.startswith("dn:")

start = time.time()
while not is_member(f"uid=lat{n - 1:06d},ou=people,dc=example,dc=org"):
    if time.time() - start > 600:
        sys.exit("the daemon did not converge on the initial orders in 10 minutes")
    time.sleep(0.2)
print(f"initial {n} orders converged in {time.time() - start:.1f} s (includes daemon start)")

latencies = []
for k in range(drops):
    i = n + k
    dn = f"uid=lat{i:06d},ou=people,dc=example,dc=org"
    tmp = os.path.join(work, "desired", f".L-{i}.toml.tmp")
    with open(tmp, "w") as f:
        f.write(f'id = "L-{i:06d}"\nuser = "lat{i:06d}"\naccess = ["wim"]\nordered_by = "karin.chef"\n')
    t0 = time.perf_counter()
    os.rename(tmp, os.path.join(work, "desired", f"L-{i}.toml"))
    while not is_member(dn):
        if time.perf_counter() - t0 > 30:
            sys.exit(f"drop {k}: not granted within 30 s")
    latencies.append(time.perf_counter() - t0)

latencies.sort()
pct = lambda p: latencies[min(len(latencies) - 1, int(round(p / 100 * len(latencies))) - 1)]
print(f"drops: {len(latencies)}, p50 {pct(50)*1000:.0f} ms, p90 {pct(90)*1000:.0f} ms, "
      f"p99 {pct(99)*1000:.0f} ms, max {latencies[-1]*1000:.0f} ms")
PY
