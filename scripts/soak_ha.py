#!/usr/bin/env python3
"""Failover soak (issue 12): three replicas of the release daemon against the
release simulator and one DynamoDB (moto_server); the leader is killed with
SIGKILL every --kill-every seconds and restarted at once, for --minutes.

Python standard library only. Needs:
  target/release/aep-s3-rotator, target/release/aep-s3-simulator
  (cargo build --release --bins), and moto_server (.venv/bin/moto_server, as
  scripts/test.sh installs it; or --moto-server PATH).

Prints, and with --json writes, the figures:

* takeover: seconds from the SIGKILL of the leader to the next "became
  leader" line of any replica (the restarted victim included) (log timestamps and the script's clock are the same
  host clock); min / median / max.
* double-writer moments, from the simulator's PATCH log (GET /_sim/patches:
  every accepted PATCH in the order applied, with the IMS client, i.e. the
  replica, that made it) and the replicas' logs. Walking the log in order,
  a moment is a PATCH by replica A such that another replica B has an
  accepted PATCH after A's previous PATCH, and A logged no "became leader"
  between its previous PATCH and this one: A went on writing in the same
  term while B wrote, i.e. both believed they led. Each (A's term, B) pair is
  counted once. Must be 0.
* expired credentials: the simulator's expired_seconds (from each
  connection's first PATCH on, the seconds its stored credentials were past
  their expiry) and the number of connections that ever had expired
  credentials. Must be 0.
* re-pushes on failover: PATCHes that are the first write of a leadership
  term on a connection whose previous credentials (pushed by the earlier
  leader) still had more than refresh_before + jitter + --slack left. Must
  be 0. The previous credentials' expiry is the real one, from the replicas'
  "credentials rotated" lines (STS answers are cached and shared between
  connections, so a key pushed at t may expire before t + lifetime).
* refused PATCHes per replica and status (412 after a takeover is the etag
  fence working, not an error).

Exit status 0 when double writers, expired credentials and re-pushes are all
0 and the simulator saw no protocol violation; 1 otherwise.
"""

import argparse
import datetime
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = "aep-s3-rotator"
ROLE_ARN = "arn:aws:iam::123456789012:role/aep-s3-ingest"
# The daemon's own AWS identity for DynamoDB (moto accepts any key when it
# does not enforce IAM). Test values, not secrets of anything real.
SOURCE_KEY_ID = "AKIASOAKSOURCE000001"
SOURCE_SECRET = "soak-source-identity-secret-0001"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"soak_ha: {what} exited at start ({proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"soak_ha: {what} did not listen on port {port} within {timeout} s")


def dynamo(url, target, body):
    """One DynamoDB JSON call (moto without IAM enforcement checks no signature)."""
    request = urllib.request.Request(
        url + "/",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/x-amz-json-1.0",
            "X-Amz-Target": "DynamoDB_20120810." + target,
            "Authorization": "AWS4-HMAC-SHA256 Credential="
            + SOURCE_KEY_ID
            + "/20260101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"{}")


def lease_holder(url):
    try:
        item = dynamo(
            url,
            "GetItem",
            {
                "TableName": TABLE,
                "Key": {"pk": {"S": "lease"}, "sk": {"S": "leader"}},
                "ConsistentRead": True,
            },
        ).get("Item")
    except OSError:
        return None
    return item["holder"]["S"] if item and "holder" in item else None


def parse_ts(text):
    # "2026-11-25T21:11:20.123456Z"; fromisoformat wants at most 6 digits.
    text = text.rstrip("Z")
    if "." in text:
        head, frac = text.split(".", 1)
        text = head + "." + frac[:6]
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.timezone.utc).timestamp()


def human(seconds):
    ms = int(round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


class Replica:
    """One replica; its log lines (parsed JSON) kept across restarts."""

    def __init__(self, name, config, env, binary, log_dir):
        self.name = name
        self.config = config
        self.env = env
        self.binary = binary
        self.lines = []
        self.lock = threading.Lock()
        self.proc = None
        self.raw = open(os.path.join(log_dir, name + ".log"), "a")
        self.starts = 0

    def start(self):
        self.starts += 1
        self.proc = subprocess.Popen(
            [self.binary, "--config", self.config, "run"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc):
        for line in proc.stderr:
            self.raw.write(line)
            try:
                value = json.loads(line)
            except ValueError:
                value = {"message": "(not JSON) " + line.strip()}
            with self.lock:
                self.lines.append(value)

    def events(self, message):
        with self.lock:
            return [l for l in self.lines if l.get("message") == message]

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def double_writer_moments(accepted, became):
    """See the module doc. `became`: replica -> sorted "became leader" times."""
    moments = set()
    last_by = {}  # client -> (seq index, at) of its latest PATCH so far
    for index, p in enumerate(accepted):
        a, at = p["client_id"], p["at_unix_ms"] / 1000
        prev = last_by.get(a)
        if prev is not None:
            prev_index, prev_at = prev
            others = {q["client_id"] for q in accepted[prev_index + 1 : index] if q["client_id"] != a}
            new_term = any(prev_at < t <= at for t in became.get(a, []))
            if others and not new_term:
                term = max([t for t in became.get(a, []) if t <= prev_at], default=0)
                for b in others:
                    moments.add((a, term, b))
        last_by[a] = (index, at)
    return sorted(moments)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--kill-every", type=float, default=30, help="seconds between leader kills")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--credential-lifetime", type=float, default=60, help="seconds (simulator STS)")
    ap.add_argument("--lease", type=float, default=6, help="seconds")
    ap.add_argument("--renew-every", type=float, default=2, help="seconds (< lease / 2)")
    ap.add_argument("--refresh-before", type=float, default=20, help="seconds (>= 2 x lease)")
    ap.add_argument("--jitter", type=float, default=2, help="seconds")
    ap.add_argument("--slack", type=float, default=2, help="seconds of tolerance in the re-push test")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--moto-server", default=os.environ.get("AEP_S3_ROTATOR_MOTO_SERVER", os.path.join(ROOT, ".venv", "bin", "moto_server")))
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    args = ap.parse_args()

    rotator = os.path.join(args.bin_dir, "aep-s3-rotator")
    simulator = os.path.join(args.bin_dir, "aep-s3-simulator")
    for path in (rotator, simulator, args.moto_server):
        if not os.access(path, os.X_OK):
            sys.exit(f"soak_ha: {path} is missing or not executable (cargo build --release --bins; scripts/test.sh installs moto)")
    if not args.renew_every < args.lease / 2:
        sys.exit("soak_ha: --renew-every must be < --lease / 2")
    if args.refresh_before < 2 * args.lease:
        sys.exit("soak_ha: --refresh-before must be >= 2 x --lease")

    work = tempfile.mkdtemp(prefix="soak-ha-")
    children = []
    replicas = []
    try:
        moto_port = free_port()
        moto = subprocess.Popen(
            [args.moto_server, "-H", "127.0.0.1", "-p", str(moto_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        children.append(moto)
        wait_listening(moto_port, moto, "moto_server")
        moto_url = f"http://127.0.0.1:{moto_port}"

        names = [f"replica-{i}" for i in range(1, args.replicas + 1)]
        client_secrets = {n: secrets.token_urlsafe(24) for n in names}
        # --config-out lists the connections the simulator made (ids, sandboxes).
        config_out = os.path.join(work, "sim-config.toml")
        sim = subprocess.Popen(
            [
                simulator,
                "--connections", str(args.connections),
                "--sandboxes", "2",
                "--credential-lifetime", human(args.credential_lifetime),
                "--config-out", config_out,
            ]
            + [a for n in names for a in ("--extra-client", f"{n}:{client_secrets[n]}")],
            stdout=subprocess.PIPE,
            stderr=open(os.path.join(work, "simulator.log"), "w"),
            text=True,
        )
        children.append(sim)
        endpoints = json.loads(sim.stdout.readline())
        platform = endpoints["platform_url"]
        base = open(config_out).read()
        connections = base[base.index("[[connections]]") :]

        env = {
            "PATH": os.environ.get("PATH", ""),
            "AWS_ACCESS_KEY_ID": SOURCE_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SOURCE_SECRET,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
            "AEP_S3_ROTATOR_LOG_FORMAT": "json",
        }
        for name in names:
            secret_file = os.path.join(work, name + ".secret")
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(client_secrets[name] + "\n")
            config = os.path.join(work, name + ".toml")
            with open(config, "w") as f:
                f.write(
                    f"""[adobe]
client_id = "{name}"
client_secret_file = "{secret_file}"
org_id = "{endpoints['org_id']}"
ims_url = "{endpoints['ims_url']}"
platform_url = "{platform}"

[aws]
region = "us-east-1"
sts_endpoint = "{endpoints['sts_url']}"
s3_endpoint = "{endpoints['s3_url']}"
role_arn = "{ROLE_ARN}"

[rotation]
session_duration = "15m"
refresh_before = "{human(args.refresh_before)}"
jitter = "{human(args.jitter)}"
concurrency = 8
retry_min = "100ms"
retry_max = "2s"
request_timeout = "2s"
shutdown_grace = "5s"

[coordination]
backend = "dynamodb"
table = "{TABLE}"
lease = "{human(args.lease)}"
renew_every = "{human(args.renew_every)}"
holder = "{name}"
endpoint = "{moto_url}"

{connections}"""
                )
            replicas.append(Replica(name, config, env, rotator, work))
        # The operator's way to make the table.
        init = subprocess.run(
            [rotator, "--config", replicas[0].config, "coordination", "init"],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
        )
        if init.returncode != 0:
            sys.exit(f"soak_ha: coordination init failed ({init.returncode}):\n{init.stderr}")
        for replica in replicas:
            replica.start()

        by_name = {r.name: r for r in replicas}
        started = time.time()
        end = started + args.minutes * 60
        kills = []  # (killed replica, kill time)
        print(f"soak_ha: {len(replicas)} replicas, {args.connections} connections, lease {args.lease}s, "
              f"renew_every {args.renew_every}s, leader killed every {args.kill_every}s for {args.minutes} min; work dir {work}",
              flush=True)
        next_kill = started + args.kill_every
        while time.time() < end:
            time.sleep(min(0.5, max(0.0, end - time.time())))
            if time.time() < next_kill:
                continue
            next_kill += args.kill_every
            if end - time.time() < args.lease + args.renew_every + 5:
                # Too late to see the takeover within the run: no more kills.
                continue
            holder = lease_holder(moto_url)
            if holder not in by_name:
                print(f"soak_ha: {time.time() - started:7.1f}s no leader to kill (lease holder {holder!r})", flush=True)
                continue
            victim = by_name[holder]
            killed_at = time.time()
            victim.kill()
            victim.start()
            kills.append((holder, killed_at))
            print(f"soak_ha: {killed_at - started:7.1f}s killed leader {holder} (restarted)", flush=True)

        # Figures, while everything still runs.
        patches = get_json(platform + "/_sim/patches")
        stats = get_json(platform + "/_sim/stats")
    finally:
        for replica in replicas:
            replica.stop()
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()

    became = {
        r.name: sorted(parse_ts(l["timestamp"]) for l in r.events("became leader")) for r in replicas
    }
    takeovers = []
    for holder, killed_at in kills:
        # Anyone's, the restarted victim's included (a new process with the
        # same holder name waits a full lease like any standby).
        later = [t for times in became.values() for t in times if t >= killed_at]
        if later:
            takeovers.append(min(later) - killed_at)
    accepted = patches["accepted"]
    moments = double_writer_moments(accepted, became)

    lifetime = args.credential_lifetime
    now = time.time()
    expired_connections = set()
    repushes = []
    last = {}
    all_terms = sorted((t, name) for name, times in became.items() for t in times)
    # The real expiry of every pushed key, from the replicas' own "credentials
    # rotated" lines: STS answers are shared between connections and cached,
    # so a key pushed at t can expire well before t + lifetime.
    expiry = {}
    for r in replicas:
        for l in r.events("credentials rotated"):
            if l.get("connection") and l.get("access_key_id") and l.get("expires_at"):
                expiry[(l["connection"], l["access_key_id"])] = parse_ts(l["expires_at"])
    for p in accepted:
        conn, at = p["connection"], p["at_unix_ms"] / 1000
        if conn in last:
            prev_client, prev_at, prev_key = last[conn]
            prev_expiry = expiry.get((conn, prev_key), prev_at + lifetime)
            if at > prev_expiry:
                expired_connections.add(conn)
            # First write of a new term on this connection (another replica wrote it last).
            if prev_client != p["client_id"]:
                left = prev_expiry - at
                if left > args.refresh_before + args.jitter + args.slack:
                    repushes.append({"connection": conn, "by": p["client_id"], "left_s": round(left, 1)})
        last[conn] = (p["client_id"], at, p.get("access_key_id"))
    for conn, (_, at, key) in last.items():
        if now > expiry.get((conn, key), at + lifetime) + 5:
            expired_connections.add(conn)

    figures = {
        "minutes": args.minutes,
        "kills": len(kills),
        "takeovers_measured": len(takeovers),
        "takeover_s": {
            "min": round(min(takeovers), 3) if takeovers else None,
            "median": round(statistics.median(takeovers), 3) if takeovers else None,
            "max": round(max(takeovers), 3) if takeovers else None,
        },
        "leader_terms": len(all_terms),
        "patches_accepted": len(accepted) + patches.get("dropped", 0),
        "patches_refused": patches["rejected"],
        "double_writer_moments": len(moments),
        "double_writer_detail": [list(m) for m in moments[:20]],
        "expired_seconds": stats["expired_seconds"],
        "connections_ever_expired": len(expired_connections),
        "connections_never_rotated": stats["connections_never_rotated"],
        "repushes_on_failover": len(repushes),
        "repush_detail": repushes[:20],
        "violations": stats["violations"],
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    if args.keep:
        print(f"soak_ha: work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    ok = (
        figures["double_writer_moments"] == 0
        and figures["expired_seconds"] == 0
        and figures["repushes_on_failover"] == 0
        and figures["violations"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
