#!/usr/bin/env python3
"""What an IMS (or STS) outage costs: requests, log lines and CPU (docs/PERFORMANCE.md).

Starts the release simulator with --connections connections (20 ms latency)
and the release daemon against it with IMS (--service sts: STS) on a closed
loopback port, the default retry_min/retry_max (1s/2m), for --seconds, then
SIGTERMs it and prints, as one JSON line:

  ims_requests      token requests the daemon made (its `ims token request
                    failed` lines: one per request that failed; IMS only)
  sts_requests      STS requests the daemon made (--service sts): the
                    prober's `rotation failed, retrying` lines, one per
                    request (the SDK's own retries are off; a connection
                    given the shared failure logs at debug)
  warn_lines        log lines at warn or above, by message (the daemon runs
                    at info: a connection given the shared IMS answer logs
                    its failure at debug, which is not counted)
  cpu_seconds       daemon utime+stime over the window (the start included)
  cpu_by_second     the same, cumulative, at the end of each whole second:
                    the start is the first step, the outage what follows
  daemon_exit       exit code after SIGTERM (0 expected)

Python 3.11 stdlib only; everything on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared harness)

#: Nothing listens here (the discard port; loopback, so plain http is allowed).
CLOSED = "http://127.0.0.1:9"
#: The config key of each service's URL.
URL_KEY = {"ims": "ims_url", "sts": "sts_endpoint"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--sandboxes", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--service", choices=sorted(URL_KEY), default="ims", help="the service that is down")
    args = p.parse_args()
    bench.ensure_binaries()
    with tempfile.TemporaryDirectory(prefix="aep-ims-outage-") as tmp:
        workdir = Path(tmp)
        sim = bench.Simulator(workdir, args.connections, args.sandboxes, "20ms", "15m")
        daemon = None
        try:
            text = sim.config_path.read_text()
            key = URL_KEY[args.service]
            text, found = re.subn(rf"(?m)^{key} = .*$", f'{key} = "{CLOSED}"', text)
            if found != 1:
                raise SystemExit(f"the simulator's config has no single {key} line")
            # The daemon's defaults, not the simulator's quick retries.
            text = re.sub(r"(?m)^retry_(min|max) = .*\n", "", text)
            sim.config_path.write_text(text)
            daemon = bench.Daemon(sim.config_path, workdir)
            by_second = []
            for second in range(1, int(args.seconds) + 1):
                time.sleep(max(0.0, daemon.started + second - time.monotonic()))
                by_second.append(round(daemon.cpu(), 2))
            time.sleep(max(0.0, daemon.started + args.seconds - time.monotonic()))
            cpu = daemon.cpu()
        finally:
            rc = daemon.stop() if daemon is not None else None
            sim.stop()
        levels: Counter = Counter(
            f'{obj["level"]}: {obj.get("message")}'
            for obj in daemon.log_objects()
            if obj.get("level") in ("warn", "error")
        )
        result = {
            "service": args.service,
            "connections": args.connections,
            "seconds": args.seconds,
            "ims_requests": levels.get("warn: ims token request failed", 0),
            "sts_requests": (
                levels.get("warn: rotation failed, retrying", 0) if args.service == "sts" else 0
            ),
            "warn_lines": dict(levels.most_common()),
            "cpu_seconds": round(cpu, 2),
            "cpu_by_second": by_second,
            "daemon_exit": rc,
        }
    print(json.dumps(result))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
