#!/usr/bin/env bash
# The nested normal-KVM lane: run the end-to-end test suites (tests/*.rs)
# inside an L1 guest with a normal /dev/kvm (see run.sh), one test at a time,
# and end with one summary line for the whole lane.
#
#   tests/nested/e2e.sh [SUITE...]     SUITE: boot, command, net, ... (default: all)
#
# Builds the test executables here first (cargo test --no-run); the L1 runs
# them from this host's filesystem. The guest artifacts come from the
# MICROVM_KERNEL, MICROVM_TEST_INITRD and MICROVM_ROOTFS variables (or the cache).
set -euo pipefail
cd "$(dirname "$0")/../.."

mapfile -t bins < <(cargo test --no-run --tests --message-format=json 2>/dev/null | python3 -c '
import json, sys
want = set(sys.argv[1:])
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and t.get("kind") == ["test"] and m.get("executable"):
        if not want or t["name"] in want:
            print(t["name"], m["executable"])
' "$@" | sort)
((${#bins[@]})) || { echo "tests/nested/e2e.sh: no end-to-end test executables found" >&2; exit 1; }

# Where the test executables are (run.sh shares it into the L1 if the L1
# would not see it otherwise, e.g. a checkout or CARGO_TARGET_DIR under /tmp).
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
# Each suite's output, on this host only (for the summary below).
dir=$(mktemp -d "${TMPDIR:-/tmp}/microvm-e2e.XXXXXX")
trap 'rm -rf "$dir"' EXIT
passed=0 failed=0 rc=0
for b in "${bins[@]}"; do
    name=${b%% *} exe=${b#* }
    # One L1 per suite, one test at a time (the L1 has a single vCPU): an L1
    # that stalls (seen under heavy host load: its vCPU idles for good) costs
    # one suite, which is run once more; a test that fails is not.
    # Bounds per suite (L1 time: image ~520 s, the others under 90 s); a run
    # over its bound counts as an L1 stall and is run once more.
    case $name in
        image) limit=${MICROVM_NESTED_TIMEOUT:-1200} ;;
        *) limit=${MICROVM_NESTED_TIMEOUT:-420} ;;
    esac
    for attempt in 1 2; do
        label=$name
        [[ $attempt == 2 ]] && label+=" (again, after an L1 stall)"
        echo "=== nested normal KVM: $label"
        set +e
        tests/nested/run.sh --timeout "$limit" --share "$target_dir" -- "$exe" --test-threads=1 |
            tee "$dir/$name.out"
        st=${PIPESTATUS[0]}
        set -e
        [[ $st == 3 ]] || break
    done
    [[ $st == 0 ]] || rc=1
    if r=$(grep -E '^test result: ' "$dir/$name.out" | tail -n1); then
        [[ $r =~ ([0-9]+)\ passed ]] && passed=$((passed + BASH_REMATCH[1]))
        [[ $r =~ ([0-9]+)\ failed ]] && failed=$((failed + BASH_REMATCH[1]))
    elif [[ $st != 0 ]]; then
        failed=$((failed + 1)) # the suite died before its summary
    fi
done
echo "nested-kvm: $passed passed, $failed failed"
exit $rc
