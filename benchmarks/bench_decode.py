"""Decoder speed: tpx.records.decode_entry vs json.loads alone on the same records, in one run.

The reference (stdlib json.loads of the record field, nothing else) is the floor most Python
consumers start from; the ratio says what full validation + sentinels + attribute serialisation
cost on top of it. Repeat runs: the machine is shared.

    python benchmarks/bench_decode.py [--records 50000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tpx.fleet import Fleet
from tpx.records import decode_entry


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    fleet = Fleet(devices=1000, seed=3, start_ms=int(time.time() * 1000) - 86_400_000, poison_fraction=0.0)
    fields = [{k.encode(): v.encode() for k, v in e.items()} for e in fleet.entries(args.records)]
    now_us = time.time_ns() // 1000
    best_tpx = best_ref = float("inf")
    for _ in range(args.repeat):
        started = time.process_time()
        for f in fields:
            decode_entry(b"1-0", f, now_us=now_us, max_future_us=86_400_000_000)
        best_tpx = min(best_tpx, time.process_time() - started)
        started = time.process_time()
        for f in fields:
            json.loads(f[b"record"])
        best_ref = min(best_ref, time.process_time() - started)
    per_tpx = best_tpx / len(fields) * 1e6
    per_ref = best_ref / len(fields) * 1e6
    print(f"decode_entry     {per_tpx:6.2f} us/record  ({1e6 / per_tpx:>9,.0f}/s)")
    print(f"json.loads only  {per_ref:6.2f} us/record  ({1e6 / per_ref:>9,.0f}/s)")
    print(f"ratio            {per_tpx / per_ref:6.2f} x the stdlib parse alone (best of {args.repeat})")


if __name__ == "__main__":
    main()
