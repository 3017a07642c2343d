#!/usr/bin/env python3
"""The straightforward sequential script that aep-s3-rotator is compared with.

It starts its own release simulator (same N and latency as the benchmark),
then does what a hand-written rotation script would: one IMS token, one STS
AssumeRole, and for each connection, one after another, GET it (for its etag)
and PATCH the three credential fields with `If-Match`. Keep-alive HTTP
connections (like a `requests.Session`), no concurrency, no retries: the
simulator runs without faults.

Connection ids and sandboxes come from the config TOML the simulator writes.
Afterwards it checks with the simulator that every connection was rotated and
that no protocol violation was recorded, and prints a summary and a JSON line
with the wall time (setup = IMS + STS, loop = the GET/PATCH loop) and the CPU
time of this script (user + system, whole process).

Python 3.11 stdlib only; talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import resource
import sys
import tempfile
import time
import tomllib
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared harness: simulator process, build)

ROLE_ARN = "arn:aws:iam::123456789012:role/aep-s3-ingest"
SCOPES = "openid,AdobeID,read_organizations,additional_info.projectedProductContext,session"
FLOW_PATH = "/data/foundation/flowservice/connections/"


class Http:
    """One keep-alive connection to one loopback base URL."""

    def __init__(self, base_url: str):
        u = urllib.parse.urlsplit(base_url)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"refusing non-loopback URL {base_url}")
        self.prefix = u.path.rstrip("/")
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None, headers=None) -> tuple[int, dict, bytes]:
        self.conn.request(method, self.prefix + path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def ims_token(ims_url: str, client_id: str, client_secret: str) -> str:
    body = urllib.parse.urlencode({
        "grant_type": "client_credentials",
        "client_id": client_id,
        "client_secret": client_secret,
        "scope": SCOPES,
    }).encode()
    status, _, data = Http(ims_url).request(
        "POST", "/ims/token/v3", body, {"Content-Type": "application/x-www-form-urlencoded"})
    if status != 200:
        raise SystemExit(f"IMS answered {status}: {data[:300]!r}")
    return json.loads(data)["access_token"]


def assume_role(sts_url: str, role_arn: str) -> dict[str, str]:
    body = urllib.parse.urlencode({
        "Action": "AssumeRole",
        "Version": "2011-06-15",
        "RoleArn": role_arn,
        "RoleSessionName": "baseline",
        "DurationSeconds": "3600",
    }).encode()
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        # The simulator checks the scheme, not the signature.
        "Authorization": "AWS4-HMAC-SHA256 Credential=AKIABASELINE/20260101/us-east-1/sts/aws4_request, "
                         "SignedHeaders=host, Signature=0",
    }
    status, _, data = Http(sts_url).request("POST", "/", body, headers)
    if status != 200:
        raise SystemExit(f"STS answered {status}: {data[:300]!r}")
    creds = {}
    for el in ET.fromstring(data).iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag in ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"):
            creds[tag] = (el.text or "").strip()
    missing = {"AccessKeyId", "SecretAccessKey", "SessionToken"} - creds.keys()
    if missing:
        raise SystemExit(f"STS answer lacks {sorted(missing)}")
    return creds


def rotate_all(platform_url: str, headers: dict, connections: list[dict], creds: dict) -> int:
    """GET + PATCH each connection in turn; returns how many failed."""
    flow = Http(platform_url)
    patch = json.dumps([
        {"op": "replace", "path": "/auth/params/s3AccessKey", "value": creds["AccessKeyId"]},
        {"op": "replace", "path": "/auth/params/s3SecretKey", "value": creds["SecretAccessKey"]},
        {"op": "replace", "path": "/auth/params/s3SessionToken", "value": creds["SessionToken"]},
    ]).encode()
    failures = 0
    for c in connections:
        h = dict(headers, **{"x-sandbox-name": c["sandbox"]})
        path = FLOW_PATH + urllib.parse.quote(c["id"], safe="")
        status, _, data = flow.request("GET", path, None, h)
        if status != 200:
            print(f"GET {c['id']}: {status} {data[:200]!r}", file=sys.stderr)
            failures += 1
            continue
        etag = json.loads(data)["items"][0]["etag"]
        status, _, data = flow.request(
            "PATCH", path, patch, dict(h, **{"If-Match": etag, "Content-Type": "application/json"}))
        if status != 200:
            print(f"PATCH {c['id']}: {status} {data[:200]!r}", file=sys.stderr)
            failures += 1
    return failures


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--latency", default="20ms")
    p.add_argument("--sandboxes", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", help="where the simulator's config goes (default: a new /tmp dir)")
    args = p.parse_args()

    bench.ensure_binaries()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="aep-baseline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sim = bench.Simulator(workdir, args.connections, max(1, min(args.sandboxes, args.connections)),
                          args.latency, "1h", seed=args.seed)
    try:
        config = tomllib.loads(sim.config_path.read_text())
        adobe = config["adobe"]
        secret_file = adobe.get("client_secret_file") or str(sim.config_path) + ".secret"
        client_secret = adobe.get("client_secret") or Path(secret_file).read_text().strip()
        client_id = sim.urls.get("client_id") or adobe["client_id"]
        org_id = sim.urls.get("org_id") or adobe["org_id"]
        role_arn = config.get("aws", {}).get("role_arn") or ROLE_ARN
        connections = config["connections"]

        cpu0 = cpu_seconds()
        t0 = time.monotonic()
        token = ims_token(sim.urls["ims_url"], client_id, client_secret)
        creds = assume_role(sim.urls["sts_url"], role_arn)
        t1 = time.monotonic()
        headers = {
            "Authorization": f"Bearer {token}",
            "x-api-key": client_id,
            "x-gw-ims-org-id": org_id,
        }
        failures = rotate_all(sim.urls["platform_url"], headers, connections, creds)
        t2 = time.monotonic()
        cpu_work = cpu_seconds() - cpu0
        stats = sim.stats()
    finally:
        sim.stop()

    result = {
        "connections": len(connections),
        "latency": args.latency,
        "setup_seconds": round(t1 - t0, 3),
        "loop_seconds": round(t2 - t1, 3),
        "total_seconds": round(t2 - t0, 3),
        "per_connection_ms": round((t2 - t1) * 1000 / max(1, len(connections)), 3),
        "cpu_seconds": round(cpu_work, 3),
        "cpu_seconds_process": round(cpu_seconds(), 3),
        "failures": failures,
        "never_rotated": stats["connections_never_rotated"],
        "violations": stats["violations"],
        "flow_requests": stats["flow_requests"],
    }
    print(f"sequential baseline: {result['connections']} connections at {args.latency}: "
          f"{result['total_seconds']:.2f} s total (setup {result['setup_seconds']:.2f} s, "
          f"{result['per_connection_ms']:.1f} ms per connection), CPU {result['cpu_seconds']:.2f} s; "
          f"failures {failures}, never rotated {result['never_rotated']}, violations {result['violations']}")
    print(json.dumps(result, sort_keys=True))
    ok = failures == 0 and result["never_rotated"] == 0 and result["violations"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
