#!/usr/bin/env bash
# Fuzzes the parsers of untrusted input — access orders (target `order`, SPEC §2) and the course
# results report (target `report`, SPEC §5) — for a bounded time each, with cargo-fuzz and
# libFuzzer. Not part of the test suite or CI: run it by hand after changing a parser.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      # default: 60 seconds for each of order, report
#
# Exits non-zero if a target crashed (a panic is a crash), and says where the crashing input is.
# Such an input belongs in a regression test next to the parser. Inputs that found new coverage
# are added to fuzz/corpus/<target>/ under hash names (ignored by git; the named seeds are kept).
set -euo pipefail

seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(order report)
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (SECONDS: a positive whole number)" >&2
  exit 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo/fuzz"

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found. Install Rust (https://rustup.rs), then run this again." >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== cargo install cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
# cargo-fuzz passes nightly-only flags (-Zsanitizer, -Cpasses=sancov…). RUSTC_BOOTSTRAP lets a
# stable rustc accept them, so no nightly toolchain is needed; on nightly it changes nothing.
export RUSTC_BOOTSTRAP=1

# AddressSanitizer catches more than panics, but needs a toolchain that supports it.
sanitizer=address
echo "== cargo fuzz build --sanitizer $sanitizer"
if ! cargo fuzz build --sanitizer "$sanitizer"; then
  sanitizer=none
  echo "== AddressSanitizer build failed; cargo fuzz build --sanitizer none"
  cargo fuzz build --sanitizer "$sanitizer"
fi

logs=$(mktemp -d "${TMPDIR:-/tmp}/coursegate-fuzz.XXXXXX")
crashed=()
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  echo "== cargo fuzz run $target ($seconds s, sanitizer $sanitizer)"
  status=0
  # -timeout: an input that takes 10 s is a hang worth reporting, not a slow run. The dictionary
  # (keys, headers, date shapes) gets the mutations past the grammar sooner.
  options=(-max_total_time="$seconds" -timeout=10 -print_final_stats=1)
  [ ! -f "dict/$target.dict" ] || options+=(-dict="dict/$target.dict")
  cargo fuzz run --sanitizer "$sanitizer" "$target" -- "${options[@]}" \
    2>&1 | tee "$logs/$target.log" || status=$?
  if [ "$status" -ne 0 ]; then
    crashed+=("$target")
    echo "!! $target failed (exit $status); log: $logs/$target.log"
    grep -E '^artifact_prefix|Test unit written to' "$logs/$target.log" | sed 's/^/!!   /' || true
  fi
done

echo
echo "== summary ($seconds s per target, sanitizer $sanitizer)"
for target in "${targets[@]}"; do
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$logs/$target.log" | grep -oE '[0-9]+$' || echo '?')
  rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$logs/$target.log" | grep -oE '[0-9]+$' || echo '?')
  echo "   $target: $runs executions, $rate per second"
done
if [ ${#crashed[@]} -gt 0 ]; then
  for target in "${crashed[@]}"; do
    while read -r input; do
      echo "!! $target crashed on $input"
      echo "!!   reproduce: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer $target $input)"
      echo "!!   minimize:  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz tmin --sanitizer $sanitizer $target $input)"
    done < <(grep -oE 'Test unit written to \S+' "$logs/$target.log" | sed 's/^Test unit written to //')
  done
  echo "!! fuzzing found crashes in: ${crashed[*]}. Add each input as a regression test next to the parser."
  exit 1
fi
echo "== no crashes"
rm -rf "$logs"
