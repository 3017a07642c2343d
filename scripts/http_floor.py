#!/usr/bin/env python3
"""The CPU floor of a Flow Service round trip on this machine (docs/PERFORMANCE.md).

Starts the release simulator with --connections connections (20 ms latency,
as scripts/bench.py does) and runs `examples/http_floor.rs` against it with
the daemon's environment: for every connection a GET (for the etag) and a
PATCH of the three credentials, --concurrency at a time, first with reqwest
alone ("bare"), then through the daemon's FlowClient ("flow_client"). Prints
its JSON line, with the simulator's own CPU per request beside it:

  <phase>.cpu_ms_per_request   the client process's utime+stime per request
  simulator_cpu_ms_per_request the simulator's, over all three phases

Compare with bench.py's `cpu_ms_per_rotation` (the whole daemon: scheduler,
logging, state, ~1.01 requests per rotation).

Builds the example (`cargo build --release --example http_floor`) when it
is missing. Python 3.11 stdlib only; everything on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared harness)

EXAMPLE_BIN = bench.ROOT / "target" / "release" / "examples" / "http_floor"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--sandboxes", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--latency", default="20ms")
    p.add_argument("--build", action="store_true", help="rebuild the example first")
    args = p.parse_args()
    bench.ensure_binaries()
    if args.build or not EXAMPLE_BIN.exists():
        bench.log("cargo build --release --example http_floor")
        rc = subprocess.call(["cargo", "build", "--release", "--example", "http_floor"], cwd=bench.ROOT)
        if rc != 0:
            sys.exit(f"building the example failed (exit {rc})")
    with tempfile.TemporaryDirectory(prefix="aep-http-floor-") as tmp:
        workdir = Path(tmp)
        sim = bench.Simulator(workdir, args.connections, args.sandboxes, args.latency, "1h")
        try:
            sim_cpu_before = bench.proc_cpu_seconds(sim.pid)
            done = subprocess.run(
                [str(EXAMPLE_BIN), str(sim.config_path), str(args.concurrency)],
                env=bench.daemon_env(),
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=600,
            )
            sim_cpu = bench.proc_cpu_seconds(sim.pid) - sim_cpu_before
        finally:
            sim.stop()
    if done.returncode != 0:
        sys.exit(f"http_floor failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    phases = ("bare", "flow_client", "hyper_conn")
    requests = sum(result[phase]["requests"] for phase in phases)
    result["latency"] = args.latency
    result["example_sha256"] = bench.binary_id(EXAMPLE_BIN)
    result["simulator_cpu_seconds"] = round(sim_cpu, 2)
    # Includes the one IMS and STS call: negligible over 3 × 2N requests.
    result["simulator_cpu_ms_per_request"] = round(sim_cpu * 1000 / max(requests, 1), 4)
    for phase in phases:
        r = result[phase]
        bench.log(
            f"{phase}: {r['requests']} requests {r['statuses']}, "
            f"{r['cpu_seconds']:.2f} s CPU, {r['cpu_ms_per_request']:.3f} ms/request, {r['wall_seconds']:.2f} s"
        )
    bench.log(f"simulator: {result['simulator_cpu_ms_per_request']:.3f} ms CPU/request")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
