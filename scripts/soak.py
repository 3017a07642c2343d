#!/usr/bin/env python3
"""Soak test of aep-s3-rotator under every simulated fault (docs/RELIABILITY.md).

Starts the release simulator with 200 connections over 5 sandboxes, every
random fault switched on at a moderate rate and 60 s credentials, and the
release daemon against it (refresh_before 20s, so every connection is rotated
about every 40 s). For --minutes it samples the daemon's memory
(/proc/PID/status VmRSS, VmHWM) and the simulator's figures, then SIGTERMs the
daemon (exit code must be 0) and the simulator, and reports:

  rotations (PATCHes the simulator accepted), etag conflicts, retries (daemon
  "rotation failed, retrying" lines), 429/5xx/resets served, protocol
  violations, seconds any connection held expired credentials, connections
  never rotated, RSS after the first full pass, at the end, and peak.

Exits 1 when violations > 0, expired seconds > 0, a connection was never
rotated, the daemon did not exit 0, or RSS grew by more than the tolerance.

RSS tolerance (default 20% + 2 MiB over the RSS after the first full pass):
the first pass brings the daemon to its working set (200 connection states,
HTTP pools, the tokio runtime); afterwards memory should be flat. It is not
byte-flat: glibc malloc keeps freed memory in per-thread arenas and
fragmentation moves RSS by a few hundred KiB to a couple of MiB (that is the
absolute 2 MiB), and buffers sized by bursts (retry waves after a 429 or an
IMS revocation, pooled connections re-opened after resets) may settle a bit
above their first-pass size (the proportional 20%). A leak of ~1 KiB per
rotation (about 3,000 rotations in 10 minutes) is ~3 MiB and gets near the
bound; the RSS slope over the run is printed too, so a slow leak shows even
within the tolerance.

Python 3.11 stdlib only; everything on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared harness)

# Moderate random-fault rates (per request), and the Retry-After sent with 429/503.
FAULTS: dict[str, object] = {
    "flow-429": 0.02,
    "flow-5xx": 0.02,
    "flow-reset": 0.01,
    "flow-slow": 0.01,
    "etag-churn": 0.03,
    "ims-revoke": 0.002,
    "sts-throttle": 0.05,
    "retry-after-secs": 1,
}


def slope_mib_per_hour(samples: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of (seconds, KiB) samples, in MiB per hour."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    sxx = sum((t - mx) ** 2 for t, _ in samples)
    if sxx == 0:
        return None
    sxy = sum((t - mx) * (v - my) for t, v in samples)
    return sxy / sxx * 3600 / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10, help="soak length from daemon start (e.g. 0.5)")
    p.add_argument("--connections", type=int, default=200)
    p.add_argument("--sandboxes", type=int, default=5)
    p.add_argument("--latency", default="20ms")
    p.add_argument("--lifetime", default="60s", help="lifetime of the simulator's STS credentials")
    p.add_argument("--refresh-before", default="20s")
    p.add_argument("--jitter", default="6s")
    p.add_argument("--slow-delay", default="2s",
                   help="simulator --flow-slow-delay (a slow answer takes twice this)")
    p.add_argument("--request-timeout", default="1500ms",
                   help="daemon request_timeout; below the slow delay so slow answers time out")
    p.add_argument("--sample-seconds", type=float, default=5)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--fault", action="append", default=[], metavar="NAME=VALUE",
                   help="override a simulator fault flag, e.g. flow-429=0.05")
    p.add_argument("--rss-tolerance-pct", type=float, default=20)
    p.add_argument("--rss-tolerance-mib", type=float, default=2)
    p.add_argument("--workdir", help="where config and logs go (default: a new /tmp dir)")
    args = p.parse_args()

    faults = dict(FAULTS)
    if args.slow_delay:
        faults["flow-slow-delay"] = args.slow_delay
    for item in args.fault:
        key, _, value = item.partition("=")
        faults[key.strip().lstrip("-")] = value.strip()

    bench.ensure_binaries()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="aep-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    duration = args.minutes * 60
    bench.log(f"soak: {args.minutes:g} min, {args.connections} connections, work directory {workdir}")

    sim = bench.Simulator(workdir, args.connections, args.sandboxes, args.latency, args.lifetime,
                          seed=args.seed, faults=faults)
    daemon = None
    samples: list[dict] = []
    report: dict = {"minutes_requested": args.minutes, "connections": args.connections,
                    "daemon_sha256": bench.binary_id(), "loadavg_before": [round(x, 2) for x in os.getloadavg()],
                    "sandboxes": args.sandboxes, "faults": faults, "workdir": str(workdir)}
    problems: list[str] = []
    snapshot: dict = {}
    rss_start = rss_end = hwm = None
    try:
        text = bench.set_rotation(
            sim.config_path.read_text(),
            session_duration="15m",  # asked of STS; the simulator issues --lifetime regardless
            refresh_before=args.refresh_before,
            jitter=args.jitter,
            request_timeout=args.request_timeout,
        )
        sim.config_path.write_text(text)
        daemon = bench.Daemon(sim.config_path, workdir)
        fp = bench.wait_first_pass(sim, daemon, timeout=min(120.0, max(30.0, duration)))
        first, mem, stats = fp["seconds"], fp["memory"], fp["stats"]
        if first is None:
            problems.append(f"no full first pass: {stats.get('connections_never_rotated')} "
                            "connections never rotated")
            bench.log(problems[-1])
            rss_start = daemon.memory()["VmRSS"] if daemon.alive() else None
        else:
            rss_start = mem["VmRSS"]
            bench.log(f"first full pass after {first:.2f} s, RSS {rss_start / 1024:.1f} MiB")
        report["first_pass_seconds"] = round(first, 2) if first is not None else None

        while daemon.alive():
            elapsed = time.monotonic() - daemon.started
            if elapsed >= duration:
                break
            time.sleep(min(args.sample_seconds, duration - elapsed))
            if not daemon.alive():
                break
            m = daemon.memory()
            if "VmRSS" not in m:  # exited since the check; reported below
                break
            s = sim.stats()
            samples.append({"t": round(time.monotonic() - daemon.started, 1), "rss_kib": m["VmRSS"],
                            "hwm_kib": m["VmHWM"], "patches": s["flow_patches_ok"],
                            "expired_seconds": s["expired_seconds"], "violations": s["violations"]})
            if len(samples) % 12 == 0:
                bench.log(f"t={samples[-1]['t']:.0f}s RSS {m['VmRSS'] / 1024:.1f} MiB, "
                          f"patches {s['flow_patches_ok']}, expired {s['expired_seconds']:.1f} s, "
                          f"violations {s['violations']}")
        if not daemon.alive():
            problems.append(f"daemon died during the soak with exit code {daemon.proc.returncode}")
            bench.log(problems[-1] + "\n" + daemon.log_tail())
            rss_end = samples[-1]["rss_kib"] if samples else None
            hwm = samples[-1]["hwm_kib"] if samples else None
        else:
            m = daemon.memory()
            rss_end, hwm = m["VmRSS"], m["VmHWM"]
        snapshot = sim.stats()
        report["duration_seconds"] = round(time.monotonic() - daemon.started, 1)
    finally:
        rc = daemon.stop() if daemon is not None else None
        sim_rc, final = sim.stop()
    messages = daemon.messages() if daemon is not None else {}
    stats = final or snapshot
    if final is None:
        problems.append(f"simulator printed no final stats on SIGTERM (exit {sim_rc}); using the last snapshot")

    report.update(
        daemon_exit=rc,
        simulator_exit=sim_rc,
        rotations=stats["flow_patches_ok"],
        etag_conflicts=stats["flow_412"],
        etag_conflict_log_lines=messages.get("etag conflict, re-reading connection", 0),
        retries=messages.get("rotation failed, retrying", 0),
        served_429=stats["flow_429"],
        served_5xx=stats["flow_5xx"],
        served_resets=stats["flow_resets"],
        served_401=stats["flow_401"],
        flow_requests=stats["flow_requests"],
        ims_tokens=stats["ims_tokens_issued"],
        sts_calls=stats["sts_assume_role"] + stats["sts_get_session_token"],
        violations=stats["violations"],
        expired_seconds=round(stats["expired_seconds"], 3),
        connections_never_rotated=stats["connections_never_rotated"],
        expired_log_lines=messages.get("credentials expired", 0),
        rss_start_mib=round(rss_start / 1024, 2) if rss_start else None,
        rss_end_mib=round(rss_end / 1024, 2) if rss_end else None,
        rss_peak_mib=round(hwm / 1024, 2) if hwm else None,
        rss_slope_mib_per_hour=None,
        log_messages=dict(messages.most_common(15)) if messages else {},
    )
    with open(workdir / "samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    after_first = [(s["t"], s["rss_kib"]) for s in samples]
    slope = slope_mib_per_hour(after_first)
    report["rss_slope_mib_per_hour"] = round(slope, 2) if slope is not None else None

    if rc != 0:
        problems.append(f"daemon exit code on SIGTERM was {rc}, expected 0")
    if report["violations"] > 0:
        problems.append(f"{report['violations']} protocol violations (see {sim.stderr_path})")
    if report["expired_seconds"] > 0:
        problems.append(f"connections held expired credentials for {report['expired_seconds']} s in total")
    if report["connections_never_rotated"] > 0:
        problems.append(f"{report['connections_never_rotated']} connections never rotated")
    if rss_start and rss_end:
        limit = rss_start * (1 + args.rss_tolerance_pct / 100) + args.rss_tolerance_mib * 1024
        report["rss_limit_mib"] = round(limit / 1024, 2)
        if rss_end > limit:
            problems.append(f"RSS grew from {rss_start / 1024:.1f} to {rss_end / 1024:.1f} MiB "
                            f"(limit {limit / 1024:.1f} MiB)")
    else:
        problems.append("RSS not measured")
    report["problems"] = problems
    report["ok"] = not problems

    r = report
    print(f"soak: {r['duration_seconds']:.0f} s ({r['duration_seconds'] / 60:.1f} min), "
          f"{r['connections']} connections / {r['sandboxes']} sandboxes, first pass {r['first_pass_seconds']} s")
    print(f"  rotations {r['rotations']}, etag conflicts {r['etag_conflicts']} "
          f"(log lines {r['etag_conflict_log_lines']}), retries {r['retries']}")
    print(f"  served: 429 x{r['served_429']}, 5xx x{r['served_5xx']}, resets x{r['served_resets']}, "
          f"401 x{r['served_401']}; IMS tokens {r['ims_tokens']}, STS calls {r['sts_calls']}")
    print(f"  violations {r['violations']}, expired seconds {r['expired_seconds']}, "
          f"never rotated {r['connections_never_rotated']}")
    print(f"  RSS after first pass {r['rss_start_mib']} MiB, at end {r['rss_end_mib']} MiB "
          f"(limit {r.get('rss_limit_mib')}), peak {r['rss_peak_mib']} MiB, "
          f"slope {r['rss_slope_mib_per_hour']} MiB/h; daemon exit {rc}")
    print(f"  daemon build {r['daemon_sha256']}, load average before {r['loadavg_before'][0]:.2f}, "
          f"logs in {workdir}")
    print("  " + ("OK" if r["ok"] else "FAILED: " + "; ".join(problems)))
    print(json.dumps(report, sort_keys=True))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
