"""Peak resident memory and time to the first training step of one command (the data pipeline's memory check).

`python benchmarks/data_memory.py -- python train.py --config tiny data.source=/tmp/prep1g train.log_every=1 ...`
runs the command under `/usr/bin/time -v` and prints its peak RSS (MB), the seconds until it printed its first
`step 1/` line, and its total wall time. Run one at a time on a quiet machine (`nice` for the others).
"""

import re
import subprocess
import sys
import time


def main() -> int:
    cmd = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    for line in proc.stdout:
        if first is None and line.startswith("step 1/"):
            first = time.perf_counter() - t0
    err = proc.stderr.read()
    proc.wait()
    total = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    if proc.returncode or rss is None or first is None:
        print(err[-3000:], file=sys.stderr)
        return 1
    print(f"peak_rss_mb {int(rss.group(1)) / 1024:.0f} first_step_s {first:.1f} total_s {total:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
