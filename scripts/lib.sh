# Shared by scripts/test.sh and scripts/demo.sh (sourced, not run): installing the OpenLDAP
# packages the integration tests and the demo need (and Samba's AD DC, which only the tests
# need), and running a throwaway slapd.
# shellcheck shell=bash

# The packages, and a file or command that shows each is there.
cg_missing_packages() {
  local missing=()
  [ -x /usr/sbin/slapd ] || missing+=(slapd)
  local tool
  for tool in ldapsearch ldapadd ldapmodify ldapwhoami; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      missing+=(ldap-utils)
      break
    fi
  done
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  # The audit tests recompute hashes with Python's json and hashlib, as an auditor would.
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  # The notification tests receive mail with a real SMTP server (aiosmtpd, Debian's python).
  /usr/bin/python3 -c 'import aiosmtpd' >/dev/null 2>&1 || missing+=(python3-aiosmtpd)
  echo "${missing[*]}"
}

# Runs a command as root: directly when we are root, else through sudo.
cg_as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "error: need root (or sudo) to run: $*" >&2
    return 1
  fi
}

# Installs slapd, ldap-utils and openssl if any is missing (Debian/Ubuntu). A freshly installed
# system slapd is kept from starting (and stopped, should it start anyway): the tests and the
# demo run their own slapd on random loopback ports and need no system service.
cg_ensure_packages() {
  local missing
  missing=$(cg_missing_packages)
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086 # $missing is a list of package names
    cg_apt_install $missing || return
    case " $missing " in
      *" slapd "*)
        # Installed just now, so it is ours to stop; a slapd that was there before is left alone.
        cg_stop_service slapd
        ;;
    esac
  fi
  cg_allow_slapd_in_tmp
}

# What the Active Directory tests need: Samba's AD DC (samba-tool provisions from the schema
# files in samba-ad-provision, which Debian 12 only recommends) and its client-side winbind.
CG_SAMBA_PACKAGES=(samba samba-ad-dc samba-ad-provision winbind)
# The system services those packages bring. The tests run their own DC on 127.0.0.1:389/636
# (fixed ports), so none of these may run.
CG_SAMBA_SERVICES=(samba-ad-dc smbd nmbd winbind)

# Installs the Samba packages if any part is missing (only scripts/test.sh needs them), keeping
# their services from starting and stopping them should they start anyway. Warns if something
# already listens where the tests' DC must (127.0.0.1:389 or :636).
cg_ensure_samba() {
  if [ ! -x /usr/sbin/samba ] || ! command -v samba-tool >/dev/null 2>&1 ||
    [ ! -d /usr/share/samba/setup/ad-schema ]; then
    cg_apt_install "${CG_SAMBA_PACKAGES[@]}" || return
    local service
    for service in "${CG_SAMBA_SERVICES[@]}"; do
      cg_stop_service "$service"
    done
  fi
  local port
  for port in 389 636; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "warning: something listens on 127.0.0.1:$port; the Active Directory tests need that" \
        "port for their own Samba DC and will fail (see: ss -ltnp)" >&2
    fi
  done
}

# Installs Debian packages without starting their services (Debian/Ubuntu only).
cg_apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing $*, and this is not a Debian/Ubuntu system (no apt-get)." >&2
    echo "Install them (or your system's equivalents) with your package manager." >&2
    return 1
  fi
  echo "Installing missing packages: $*"
  # policy-rc.d exit code 101 tells invoke-rc.d not to start services during installation.
  local policy=/usr/sbin/policy-rc.d created_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | cg_as_root tee "$policy" >/dev/null
    cg_as_root chmod 755 "$policy"
    created_policy=1
  fi
  local status=0
  cg_as_root apt-get update -qq &&
    cg_as_root env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "$@" || status=$?
  if [ -n "$created_policy" ]; then
    cg_as_root rm -f "$policy"
  fi
  return "$status"
}

# Stops a system service and keeps it from starting at boot: through systemd where systemd runs
# (containers often have none), else through its init script, if it has one. Never fails.
cg_stop_service() {
  local service=$1
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    cg_as_root systemctl disable --now "$service" >/dev/null 2>&1 || true
  elif [ -x "/etc/init.d/$service" ]; then
    cg_as_root service "$service" stop >/dev/null 2>&1 || true
  fi
}

# Ubuntu confines /usr/sbin/slapd with AppArmor to its system paths; our throwaway instances live
# in ${TMPDIR:-/tmp}/coursegate-slapd-*. Allow exactly that in the profile's local override.
cg_allow_slapd_in_tmp() {
  local profile=/etc/apparmor.d/usr.sbin.slapd local_file=/etc/apparmor.d/local/usr.sbin.slapd
  [ -f "$profile" ] && [ -d /sys/kernel/security/apparmor ] || return 0
  command -v apparmor_parser >/dev/null 2>&1 || return 0
  local tmp=${TMPDIR:-/tmp}
  tmp=${tmp%/}
  local rule="$tmp/coursegate-slapd-*/** rwk,"
  if [ -f "$local_file" ] && grep -qxF "  $rule" "$local_file"; then
    return 0
  fi
  echo "Allowing slapd (AppArmor) to use $tmp/coursegate-slapd-*"
  printf '  %s/coursegate-slapd-*/ r,\n  %s\n' "$tmp" "$rule" | cg_as_root tee -a "$local_file" >/dev/null
  cg_as_root apparmor_parser -r "$profile"
}

# Starts a throwaway slapd in directory $1 (made by the caller, named coursegate-slapd-*) loaded
# with the LDIF file $2, on a random free loopback port, from examples/slapd.conf.in; $3 (optional)
# is more database configuration (e.g. "overlay memberof").
# Sets CG_SLAPD_URL, CG_SLAPD_PID, CG_ADMIN_DN and CG_ADMIN_PASSWORD. Stop it with cg_stop_slapd.
cg_start_slapd() {
  local dir=$1 ldif=$2 extra=${3:-} repo
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  CG_ADMIN_DN="cn=admin,dc=example,dc=org"
  CG_ADMIN_PASSWORD="admin-$RANDOM$RANDOM"
  mkdir -p "$dir/data"
  local conf
  conf=$(<"$repo/examples/slapd.conf.in")
  conf=${conf//@DIR@/"$dir"}
  conf=${conf//@ROOTPW@/"$CG_ADMIN_PASSWORD"}
  conf=${conf//@TLS@/}
  conf=${conf//@EXTRA@/"$extra"}
  printf '%s\n' "$conf" >"$dir/slapd.conf"
  # Copied, so that a confined (AppArmor) slapd needs to read nothing outside its directory.
  cp "$ldif" "$dir/initial.ldif"
  /usr/sbin/slapd -T add -q -f "$dir/slapd.conf" -l "$dir/initial.ldif"

  local attempt port
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    # Below Linux's ephemeral range, so outgoing connections do not take it.
    port=$((20000 + RANDOM % 12000))
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      continue # something listens there
    fi
    CG_SLAPD_URL="ldap://127.0.0.1:$port"
    /usr/sbin/slapd -d none -h "$CG_SLAPD_URL/" -f "$dir/slapd.conf" >"$dir/slapd.log" 2>&1 &
    CG_SLAPD_PID=$!
    local waited
    for waited in $(seq 1 1000); do
      if ! kill -0 "$CG_SLAPD_PID" 2>/dev/null; then
        wait "$CG_SLAPD_PID" 2>/dev/null || true
        CG_SLAPD_PID=""
        if grep -q "errno=98" "$dir/slapd.log"; then
          break # the port was taken after all: next attempt
        fi
        echo "error: slapd did not start:" >&2
        cat "$dir/slapd.log" >&2
        return 1
      fi
      if LDAPNOINIT=1 ldapwhoami -x -H "$CG_SLAPD_URL" -D "$CG_ADMIN_DN" \
        -w "$CG_ADMIN_PASSWORD" >/dev/null 2>&1; then
        return 0
      fi
      if [ "$waited" -eq 1000 ]; then
        echo "error: slapd did not answer within 10 s:" >&2
        cat "$dir/slapd.log" >&2
        cg_stop_slapd
        return 1
      fi
      sleep 0.01
    done
    echo "port $port was taken (attempt $attempt), trying another" >&2
  done
  echo "error: no free port for slapd" >&2
  return 1
}

cg_stop_slapd() {
  if [ -n "${CG_SLAPD_PID:-}" ]; then
    kill "$CG_SLAPD_PID" 2>/dev/null || true
    wait "$CG_SLAPD_PID" 2>/dev/null || true
    CG_SLAPD_PID=""
  fi
}

# Writes to $1 the example config (examples/coursegate.toml) pointed at the running throwaway
# slapd ($CG_SLAPD_URL) and at files next to $1: desired/, state/, audit.jsonl, results.csv and
# ldap-password. `listen` is dropped (one-shot commands do not use it; benchmarks must not clash).
cg_write_config() {
  local cfg=$1 repo
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  awk -v url="$CG_SLAPD_URL" '
    /^\[/ { section = $1 }
    section == "[daemon]" && /^desired_dir *=/ { print "desired_dir = \"desired\""; next }
    section == "[daemon]" && /^state_dir *=/ { print "state_dir = \"state\""; next }
    section == "[daemon]" && /^audit_log *=/ { print "audit_log = \"audit.jsonl\""; next }
    section == "[daemon]" && /^listen *=/ { next }
    section == "[ldap]" && /^url *=/ { print "url = \"" url "\""; next }
    section == "[lms]" && /^path *=/ { print "path = \"results.csv\""; next }
    { print }
  ' "$repo/examples/coursegate.toml" >"$cfg"
  local expected
  for expected in 'desired_dir = "desired"' 'state_dir = "state"' 'audit_log = "audit.jsonl"' \
    "url = \"$CG_SLAPD_URL\"" 'path = "results.csv"'; do
    if ! grep -qxF "$expected" "$cfg"; then
      echo "error: could not set '$expected' in $cfg; has examples/coursegate.toml changed?" >&2
      return 1
    fi
  done
}

# Makes sure a NATS server with JetStream listens on 127.0.0.1:4222 (the queue tests use it):
# installs the Debian package nats-server if needed and starts it in the background.
cg_ensure_nats() {
  if (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
    return 0
  fi
  if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    echo "Installing nats-server"
    cg_as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive cg_as_root apt-get install -y -qq nats-server
  fi
  local bin
  bin=$(command -v nats-server || echo /usr/sbin/nats-server)
  local store=${TMPDIR:-/tmp}/coursegate-nats-store
  mkdir -p "$store"
  echo "Starting nats-server with JetStream on 127.0.0.1:4222"
  "$bin" -a 127.0.0.1 -p 4222 -js -sd "$store" >"$store/nats.log" 2>&1 &
  local i
  for i in $(seq 1 100); do
    if (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "error: nats-server did not start; see $store/nats.log" >&2
  return 1
}
