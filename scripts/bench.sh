#!/usr/bin/env bash
# Benchmark (issue 8): coursegate against the directory's own limit and against the per-user
# script an admin would otherwise write. For each N (default 20,000) users, three profiles
# (wim, pacs, kardiopacs) and an order for every user naming all three, every course passed,
# each contender gets a fresh slapd (same config: mdb, memberof overlay, index on memberOf):
#
#   1. initial convergence: `ldapmodify` adding every membership in one modify per group (the
#      directory's own limit; at most 50,000 values per modify), then `coursegate apply`, both
#      with the files just written, as pairs one after the other (REPEAT, default 5 up to
#      REPEAT_MAX users, default 20000, else 1; the medians are compared); the same two once
#      with the page cache dropped before each (up to COLD_MAX, default 20000); and, last, a
#      Python ldap3 script that looks each user up and adds them with one modify per membership
#      (the tool an admin would write; skipped above PER_USER_MAX, default 20000, because it
#      runs for many minutes);
#   2. steady state: `coursegate apply` with nothing changed, and with 1 % of the orders changed
#      (1 % withdrawn, 1 % new), with their LDAP operation counts;
#   3. daemon latency: order file renamed into place -> membership visible, over 100 drops, with
#      all N orders loaded;
#   4. peak RSS (VmHWM) of `coursegate run` with all orders loaded (run as the systemd unit
#      runs it, with MIMALLOC_PURGE_DELAY=0).
#
# Prints Markdown for BENCHMARKS.md. Not part of the test suite.
#
#   scripts/bench.sh [N ...]          e.g. scripts/bench.sh 20000 50000 100000
#   BIN=/path/to/coursegate scripts/bench.sh 20000    (another build, same benchmark)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib.sh
source "$repo/scripts/lib.sh"
cg_ensure_packages
if ! /usr/bin/python3 -c 'import ldap3' 2>/dev/null; then
  echo "Installing python3-ldap3 (the per-user script's LDAP library)" >&2
  cg_as_root apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive cg_as_root apt-get install -y -qq --no-install-recommends python3-ldap3 >&2
fi
# BIN=path benchmarks another build (say, an older commit's) with this script.
if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  cargo build --release --quiet
  bin="$repo/target/release/coursegate"
fi
per_user_max=${PER_USER_MAX:-20000}
cold_max=${COLD_MAX:-20000}
drops=${DROPS:-100}
repeat_max=${REPEAT_MAX:-20000}
[ $# -gt 0 ] || set -- 20000

work=$(mktemp -d "${TMPDIR:-/tmp}/coursegate-slapd-bench.XXXXXX")
daemon_pid=""
finish() {
  if [ -n "$daemon_pid" ]; then kill "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; fi
  cg_stop_slapd
  if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap finish EXIT

service_dn="cn=coursegate,ou=services,dc=example,dc=org"
service_pw=$(<"$repo/examples/ldap-password")
groups=(cn=wim-users,ou=groups,dc=example,dc=org cn=pacs-users,ou=groups,dc=example,dc=org
  cn=kardiopacs-users,ou=groups,dc=example,dc=org)
slapd_extra="overlay memberof
index memberOf eq
limits dn.exact=\"$service_dn\" size.prtotal=unlimited size.soft=unlimited size.hard=unlimited"

fresh_slapd() {
  cg_stop_slapd
  rm -rf "$work/slapd"
  cg_start_slapd "$work/slapd" "$work/directory.ldif" "$slapd_extra"
}

seconds() { # command... -> prints wall seconds; the command's output goes to $work/out, $work/err
  local start end
  # Each contender starts with nothing left to write back: without this, the first timed run
  # paid for flushing the 20,000 order files just written (and the next for the last run's
  # 50 MB of state and audit log), with fsyncs waiting behind it.
  sync
  start=$(date +%s.%N)
  "$@" >"$work/out" 2>"$work/err" || { echo "failed: $*" >&2; tail -20 "$work/err" >&2; return 1; }
  end=$(date +%s.%N)
  echo "$end - $start" | bc
}

# Writes back and drops the page cache (root only); false if that cannot be done.
drop_caches() { sync && cg_as_root sh -c 'echo 3 >/proc/sys/vm/drop_caches' 2>/dev/null; }

ops() { grep -o 'ldap_operations=[0-9]*' "$work/err" | tail -1 | cut -d= -f2; }

member_count() {
  LDAPNOINIT=1 ldapsearch -x -LLL -o ldif-wrap=no -H "$CG_SLAPD_URL" -D "$CG_ADMIN_DN" \
    -w "$CG_ADMIN_PASSWORD" -b "$1" -s base member | grep -c '^member:' || true
}

ratio() { echo "scale=2; $1 / $2" | bc; }

# The median of the numbers given (the mean of the middle two for an even count).
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# "min–max" of the numbers given, two decimals.
range() { printf '%s\n' "$@" | sort -n | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.2f–%.2f", lo, hi}'; }

echo "## Run of $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(uname -sr), slapd $(/usr/sbin/slapd -VV 2>&1 | grep -o 'slapd [0-9.]*' | head -1 | cut -d' ' -f2), mdb with the memberof overlay."
echo "Command: \`${BIN:+BIN=$BIN }scripts/bench.sh $*\`"
echo

for n in "$@"; do
  extra=$((n / 100))
  total=$((n + extra + drops))
  rm -rf "$work/desired" "$work/state" "$work/audit.jsonl"
  mkdir -p "$work/desired"
  # The directory: example base entries plus `total` people with mail.
  {
    cat "$repo/examples/directory.ldif"
    for ((i = 0; i < total; i++)); do
      printf '\ndn: uid=b%07d,ou=people,dc=example,dc=org\nobjectClass: inetOrgPerson\nuid: b%07d\ncn: Bench %d\nsn: Bench\nmail: b%07d@example.org\n' "$i" "$i" "$i" "$i"
    done
  } >"$work/directory.ldif"
  {
    echo "Username;Course;Passed;Date"
    for ((i = 0; i < total; i++)); do
      printf 'b%07d;Wim grundkurs;true;2026-11-01\nb%07d;PACS grundkurs;true;2026-11-01\nb%07d;KardioPACS grundkurs;true;2026-11-01\n' "$i" "$i" "$i"
    done
  } >"$work/results.csv"
  order() { printf 'id = "B-%07d"\nuser = "b%07d"\naccess = ["wim", "pacs", "kardiopacs"]\nordered_by = "karin.chef"\n' "$1" "$1"; }
  for ((i = 0; i < n; i++)); do order "$i" >"$work/desired/B-$i.toml"; done
  cp "$repo/examples/ldap-password" "$work/" && chmod 600 "$work/ldap-password"

  # (a) The directory's own limit: one modify per group with every member (50,000 values at
  # most per modify, like coursegate: slapd refuses an authenticated request above 4 MB).
  {
    for g in "${groups[@]}"; do
      for ((start = 0; start < n; start += 50000)); do
        printf 'dn: %s\nchangetype: modify\nadd: member\n' "$g"
        for ((i = start; i < n && i < start + 50000; i++)); do printf 'member: uid=b%07d,ou=people,dc=example,dc=org\n' "$i"; done
        printf '\n'
      done
    done
  } >"$work/batched.ldif"
  # (a) and (c), REPEAT times (default 5 up to REPEAT_MAX users, default 20000, else once), one after the other (this machine's speed drifts by a third
  # within minutes): `ldapmodify`, then coursegate right after it, both finding the files just
  # written in the page cache. The median of each is reported, with the range. (Run after the
  # per-user script, the first `apply` found many of its 20,000 order files evicted by then, on
  # a machine that drops them within minutes.) The last `apply`'s state and slapd are the ones
  # the steady-state runs below start from.
  repeat=${REPEAT:-$(if [ "$n" -le "$repeat_max" ]; then echo 5; else echo 1; fi)}
  runs_ldapmodify=()
  runs_apply=()
  for ((r = 0; r < repeat; r++)); do
    fresh_slapd
    runs_ldapmodify+=("$(seconds env LDAPNOINIT=1 ldapmodify -x -H "$CG_SLAPD_URL" -D "$service_dn" -w "$service_pw" -f "$work/batched.ldif")")
    [ "$(member_count "${groups[2]}")" -eq $((n + 1)) ] || { echo "ldapmodify did not add every member" >&2; exit 1; }
    fresh_slapd
    cg_write_config "$work/coursegate.toml"
    rm -rf "$work/state" "$work/audit.jsonl"
    runs_apply+=("$(seconds "$bin" -c "$work/coursegate.toml" apply)")
    o_apply=$(ops)
    [ "$(member_count "${groups[2]}")" -eq $((n + 1)) ] || { echo "coursegate did not add every member" >&2; exit 1; }
  done
  t_ldapmodify=$(median "${runs_ldapmodify[@]}")
  t_apply=$(median "${runs_apply[@]}")

  # The same pair with the page cache dropped before each (the files, slapd's database and the
  # programs read from the disk), once, up to COLD_MAX users. The state of this `apply` is the
  # one the steady-state runs below start from.
  t_ldapmodify_cold="-"
  t_apply_cold="-"
  if [ "$n" -le "$cold_max" ] && drop_caches; then
    fresh_slapd
    drop_caches
    t_ldapmodify_cold=$(seconds env LDAPNOINIT=1 ldapmodify -x -H "$CG_SLAPD_URL" -D "$service_dn" -w "$service_pw" -f "$work/batched.ldif")
    [ "$(member_count "${groups[2]}")" -eq $((n + 1)) ] || { echo "ldapmodify did not add every member" >&2; exit 1; }
    fresh_slapd
    cg_write_config "$work/coursegate.toml"
    rm -rf "$work/state" "$work/audit.jsonl"
    drop_caches
    t_apply_cold=$(seconds "$bin" -c "$work/coursegate.toml" apply)
    [ "$(member_count "${groups[2]}")" -eq $((n + 1)) ] || { echo "coursegate did not add every member" >&2; exit 1; }
  fi
  t_nochange=$(seconds "$bin" -c "$work/coursegate.toml" apply)
  o_nochange=$(ops)
  grep -q 'granted=0 revoked=0 failed=0' "$work/err" || { echo "the second apply changed something" >&2; exit 1; }
  for ((i = 0; i < extra; i++)); do rm "$work/desired/B-$i.toml"; done
  for ((i = n; i < n + extra; i++)); do order "$i" >"$work/desired/B-$i.toml"; done
  t_change=$(seconds "$bin" -c "$work/coursegate.toml" apply --allow-revocations $((3 * extra)))
  o_change=$(ops)
  grep -q "granted=$((3 * extra)) revoked=$((3 * extra)) failed=0" "$work/err" || { echo "the 1 % apply did not do 3 x $extra grants and revocations" >&2; tail -3 "$work/err" >&2; exit 1; }

  # (d) The daemon: latency of single drops with everything loaded, and its peak RSS.
  # With the environment systemd/coursegate.service gives it.
  RUST_LOG=warn MIMALLOC_PURGE_DELAY=0 "$bin" -c "$work/coursegate.toml" run 2>"$work/daemon.log" &
  daemon_pid=$!
  export CG_SLAPD_URL CG_ADMIN_DN CG_ADMIN_PASSWORD
  latency=$(/usr/bin/python3 - "$work" "$((n + extra))" "$drops" <<'PY'
import os, subprocess, sys, time
work, first, drops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
url, admin, pw = os.environ["CG_SLAPD_URL"], os.environ["CG_ADMIN_DN"], os.environ["CG_ADMIN_PASSWORD"]
group = "cn=wim-users,ou=groups,dc=example,dc=org"
env = dict(os.environ, LDAPNOINIT="1")
def is_member(dn):
    out = subprocess.run(["ldapsearch", "-x", "-LLL", "-H", url, "-D", admin, "-w", pw, "-b", group,
                          "-s", "base", f"(member={dn})", "1.1"], capture_output=True, text=True, env=env)
    return out.stdout.startswith("dn:")
# Ready: the daemon has done its first pass once status.json exists.
start = time.time()
while not os.path.exists(os.path.join(work, "state", "status.json")):
    if time.time() - start > 600:
        sys.exit("the daemon did not finish its first pass in 10 minutes")
    time.sleep(0.1)
lat = []
for k in range(drops):
    i = first + k
    dn = f"uid=b{i:07d},ou=people,dc=example,dc=org"
    tmp = os.path.join(work, "desired", f".B-{i}.toml.tmp")
    with open(tmp, "w") as f:
        f.write(f'id = "B-{i:07d}"\nuser = "b{i:07d}"\naccess = ["wim", "pacs", "kardiopacs"]\nordered_by = "karin.chef"\n')
    t0 = time.perf_counter()
    os.rename(tmp, os.path.join(work, "desired", f"B-{i}.toml"))
    while not is_member(dn):
        if time.perf_counter() - t0 > 30:
            sys.exit(f"drop {k}: not granted within 30 s")
    lat.append(time.perf_counter() - t0)
lat.sort()
pct = lambda p: lat[min(len(lat) - 1, max(0, int(round(p / 100 * len(lat))) - 1))]
print(f"{pct(50)*1000:.0f} {pct(99)*1000:.0f} {lat[-1]*1000:.0f}")
PY
)
  rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$daemon_pid/status")
  kill "$daemon_pid"; wait "$daemon_pid" 2>/dev/null || true; daemon_pid=""
  read -r p50 p99 pmax <<<"$latency"

  # (b) The per-user script, last: its minutes would let the order files leave the page cache
  # before coursegate's first run.
  t_script="-"
  if [ "$n" -le "$per_user_max" ]; then
    fresh_slapd
    t_script=$(seconds /usr/bin/python3 - "$CG_SLAPD_URL" "$service_dn" "$service_pw" "$n" <<'PY'
import sys
from ldap3 import Connection, Server, MODIFY_ADD
url, dn, pw, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
groups = ["cn=wim-users,ou=groups,dc=example,dc=org", "cn=pacs-users,ou=groups,dc=example,dc=org",
          "cn=kardiopacs-users,ou=groups,dc=example,dc=org"]
conn = Connection(Server(url), dn, pw, auto_bind=True)
for i in range(n):
    user = f"b{i:07d}"
    conn.search("ou=people,dc=example,dc=org", f"(uid={user})", attributes=["1.1"])
    if len(conn.entries) != 1:
        sys.exit(f"{user}: {len(conn.entries)} entries")
    user_dn = conn.entries[0].entry_dn
    for g in groups:
        if not conn.modify(g, {"member": [(MODIFY_ADD, [user_dn])]}):
            sys.exit(f"{user} -> {g}: {conn.result}")
PY
)
    [ "$(member_count "${groups[2]}")" -eq $((n + 1)) ] || { echo "the script did not add every member" >&2; exit 1; }
  fi


  echo "### N = $n users, $((3 * n)) memberships"
  echo
  echo "| measure | coursegate | reference | ratio |"
  echo "|---|---|---|---|"
  if [ "$repeat" -gt 1 ]; then
    echo "| initial convergence ($((3 * n)) grants), median of $repeat pairs (range) | $(printf %.2f "$t_apply") s ($(range "${runs_apply[@]}")), $o_apply LDAP ops | batched \`ldapmodify\`: $(printf %.2f "$t_ldapmodify") s ($(range "${runs_ldapmodify[@]}")) | $(ratio "$t_apply" "$t_ldapmodify")× (target ≤ 1.5×) |"
    echo "| the same, pair by pair (\`apply\` / \`ldapmodify\`) | $(for ((r = 0; r < repeat; r++)); do printf '%s× ' "$(ratio "${runs_apply[r]}" "${runs_ldapmodify[r]}")"; done) | | |"
  else
    echo "| initial convergence ($((3 * n)) grants) | $(printf %.2f "$t_apply") s, $o_apply LDAP ops | batched \`ldapmodify\`: $(printf %.2f "$t_ldapmodify") s | $(ratio "$t_apply" "$t_ldapmodify")× (target ≤ 1.5×) |"
  fi
  if [ "$t_apply_cold" != "-" ]; then
    echo "| initial convergence, page cache dropped before each | $(printf %.2f "$t_apply_cold") s | batched \`ldapmodify\`: $(printf %.2f "$t_ldapmodify_cold") s | $(ratio "$t_apply_cold" "$t_ldapmodify_cold")× |"
  fi
  if [ "$t_script" != "-" ]; then
    echo "| initial convergence vs per-user script | $(printf %.2f "$t_apply") s | Python ldap3, one search + 3 modifies per user: $(printf %.2f "$t_script") s | $(ratio "$t_script" "$t_apply")× faster (target ≥ 5×) |"
  fi
  echo "| \`apply\`, nothing changed | $(printf %.2f "$t_nochange") s, $o_nochange LDAP ops | target < 1 s, a few searches per group | $(ratio "$t_nochange" 1)× of 1 s |"
  echo "| \`apply\`, 1 % changed ($((3 * extra)) grants + $((3 * extra)) revocations) | $(printf %.2f "$t_change") s, $o_change LDAP ops | | |"
  echo "| daemon latency, drop → member ($drops drops) | p50 $p50 ms, p99 $p99 ms, max $pmax ms | target p99 < 1000 ms | $(ratio "$p99" 1000)× of 1 s |"
  rss_mb=$(echo "scale=1; $rss_kb * 1024 / 1000000" | bc)
  echo "| daemon peak RSS (VmHWM) | $rss_mb MB | target < 100 MB | $(ratio "$rss_mb" 100)× of 100 MB |"
  echo
done
