"""Turn trial's closing line into "N passed, N failed[, N skipped]".

trial ends with ``PASSED (successes=12)`` or ``FAILED (skips=1, failures=2,
errors=1, successes=9)``. Exits non-zero when trial did, when anything failed,
or when no test ran at all, so that CI never reports an empty run as green.
"""

import re
import sys


def main() -> int:
    log_path, trial_rc = sys.argv[1], int(sys.argv[2])
    with open(log_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    matches = re.findall(r"^(PASSED|FAILED) \(([^)]*)\)\s*$", text, re.MULTILINE)
    if not matches:
        print("0 passed, 1 failed  (trial printed no summary)")
        return 1
    counts: dict[str, int] = {}
    for item in matches[-1][1].split(","):
        key, _, value = item.strip().partition("=")
        counts[key] = int(value)
    passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
    failed = (
        counts.get("failures", 0)
        + counts.get("errors", 0)
        + counts.get("unexpectedSuccesses", 0)
    )
    line = f"{passed} passed, {failed} failed"
    if counts.get("skips"):
        line += f", {counts['skips']} skipped"
    print(line)
    if failed or trial_rc != 0 or passed == 0:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
