"""The Ray control plane of a local head (engine.local_head): token auth and loopback.

Replays the requests of the published unauthenticated-dashboard attacks against a head
with token authentication, without the token (refused) and with it (they work, except
where a browser-borne request is refused anyway):

- CVE-2023-48022 (ShadowRay): an unauthenticated `POST /api/jobs/` whose entrypoint is a
  shell command, sent by a script (curl-like: no browser headers).
- CVE-2025-62593: the same job submission sent by a browser page after DNS rebinding:
  the page's own origin (Host/Origin of the attacker's name), Sec-Fetch-* headers, and a
  User-Agent that does not start with "Mozilla" (Firefox/Safari let fetch() set it),
  which slipped past Ray's browser check before 2.52.
- CVE-2026-27482: unauthenticated DELETE requests (delete a job, shut Serve down), which
  Ray's browser guard did not cover before 2.54 (it blocked POST/PUT only).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import httpx
import psutil
import pytest

from engine.local_head import start_local_head

MARKER = "grainflow-was-here"
SHELL_JOB = {"entrypoint": f"echo {MARKER}; id"}
REBOUND_BROWSER = {  # what fetch() on http://rebind.attacker.example:PORT/ sends after rebinding
    "User-Agent": "curl/8.0 (fetch with an overridden user agent)",
    "Origin": "http://rebind.attacker.example", "Referer": "http://rebind.attacker.example/",
    "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty",
}


class _UsageReports:
    """A loopback HTTP listener that records the paths and bodies posted to it."""

    def __init__(self):
        import http.server
        import threading

        posted = self.posted = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                posted.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def usage_reports():
    reports = _UsageReports()
    yield reports
    reports.server.shutdown()


@pytest.fixture(scope="module")
def head(tmp_path_factory, usage_reports):
    saved = os.environ.get("RAY_USAGE_STATS_REPORT_URL")
    os.environ["RAY_USAGE_STATS_REPORT_URL"] = usage_reports.url  # loopback: the head keeps it
    try:
        h = start_local_head(tmp_path_factory.mktemp("head"), num_cpus=1)
    finally:
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_REPORT_URL")
        else:
            os.environ["RAY_USAGE_STATS_REPORT_URL"] = saved
    yield h
    h.stop(timeout_s=10)


@pytest.fixture(scope="module")
def token(head) -> str:
    return head.token_path.read_text().strip()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def wait_terminal(client: httpx.Client, job_id: str, headers, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get(f"/api/jobs/{job_id}", headers=headers).json()["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end within {timeout_s} s")


class TestTokenFile:
    def test_only_the_user_can_read_it(self, head):
        assert (head.token_path.stat().st_mode & 0o777) == 0o600
        assert len(head.token_path.read_text().strip()) >= 32


class TestWithoutTheToken:
    """Every request class of the three CVEs, and plain API reads, are refused (401)."""

    def test_cve_2023_48022_job_submission_by_a_script(self, head):
        r = httpx.post(f"{head.dashboard_url}/api/jobs/", json=SHELL_JOB)
        assert r.status_code == 401 and "authentication" in r.text.lower()

    def test_cve_2025_62593_job_submission_by_a_rebound_browser_page(self, head):
        host = head.dashboard_url.removeprefix("http://")
        headers = {**REBOUND_BROWSER, "Host": f"rebind.attacker.example:{host.split(':')[1]}"}
        r = httpx.post(f"{head.dashboard_url}/api/jobs/", json=SHELL_JOB, headers=headers)
        assert r.status_code == 401

    @pytest.mark.parametrize("path", ["/api/jobs/raysubmit_anything", "/api/serve/applications/"])
    @pytest.mark.parametrize("as_browser", [False, True], ids=["script", "browser"])
    def test_cve_2026_27482_deletes(self, head, path, as_browser):
        r = httpx.delete(f"{head.dashboard_url}{path}", headers=REBOUND_BROWSER if as_browser else None)
        assert r.status_code == 401

    @pytest.mark.parametrize("path", ["/api/jobs/", "/api/version", "/api/v0/tasks", "/api/v0/nodes",
                                      "/api/cluster_status", "/logical/actors", "/api/serve/applications/"])
    def test_dashboard_api_reads(self, head, path):
        assert httpx.get(f"{head.dashboard_url}{path}").status_code == 401

    def test_a_wrong_token_is_refused_too(self, head):
        r = httpx.post(f"{head.dashboard_url}/api/jobs/", json=SHELL_JOB, headers=bearer("0" * 64))
        assert r.status_code == 403

    def test_joining_the_cluster_without_the_token_fails(self, head):
        """The GCS (gRPC) refuses a driver that has no token: ray.init fails, no job runs."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.update({k: v for k, v in head.client_env().items() if not k.startswith("RAY_AUTH")})
        # ray.init retries the GCS connection once a second, 20 times by default, and the
        # GCS refuses every try the same way (AuthenticationError): 2 tries give the same
        # refusal ~18 s sooner. (This variable sets that driver-side retry count only;
        # the head is up, the fixture waited for it.)
        env["RAY_gcs_server_port_wait_time_s"] = "2"
        code = "import ray; ray.init(log_to_driver=False); print('CONNECTED', ray.cluster_resources())"
        p = subprocess.run([sys.executable, "-c", code], env=env, cwd=tempfile.gettempdir(), capture_output=True,
                           text=True, timeout=120)
        assert p.returncode != 0 and "CONNECTED" not in p.stdout
        assert "auth" in (p.stdout + p.stderr).lower(), p.stderr[-3000:]


class TestWithTheToken:
    def test_submit_follow_and_delete_a_job(self, head, token):
        with httpx.Client(base_url=head.dashboard_url, timeout=60) as client:
            r = client.post("/api/jobs/", json=SHELL_JOB, headers=bearer(token))
            assert r.status_code == 200, r.text
            job_id = r.json()["submission_id"]
            assert wait_terminal(client, job_id, bearer(token)) == "SUCCEEDED"
            logs = client.get(f"/api/jobs/{job_id}/logs", headers=bearer(token)).json()["logs"]
            assert MARKER in logs
            assert client.get("/api/jobs/", headers=bearer(token)).status_code == 200
            # CVE-2026-27482's request, with the token: the job is deleted
            assert client.delete(f"/api/jobs/{job_id}", headers=bearer(token)).status_code == 200
            assert client.get(f"/api/jobs/{job_id}", headers=bearer(token)).status_code == 404

    def test_a_rebound_browser_page_is_refused_even_with_the_token(self, head, token):
        """Defence in depth: Ray 2.60 refuses browser-borne mutations (Sec-Fetch-*)."""
        r = httpx.post(f"{head.dashboard_url}/api/jobs/", json=SHELL_JOB, headers={**REBOUND_BROWSER, **bearer(token)})
        assert r.status_code in (403, 405)

    def test_the_jobs_sdk_with_the_token(self, head):
        from engine.submit import follow_job, job_client, submit_job

        client = job_client(head.dashboard_url, token_path=str(head.token_path))
        job_id = submit_job(client, entrypoint=f"python -c \"print('{MARKER}')\"")
        lines: list[str] = []
        assert follow_job(client, job_id, on_line=lines.append, poll_s=0.5, timeout_s=120) == "SUCCEEDED"
        assert MARKER in "\n".join(lines)


class TestListeningSockets:
    def test_every_socket_of_the_head_and_a_worker_node_is_loopback(self, head):
        """Ray's single-machine mode binds the GCS, raylets, agents and dashboard to
        127.0.0.1 (engine.local_head explains why `--node-ip-address` does not)."""
        head.add_worker(num_cpus=1, resources={"node-a": 1})
        sockets = _listening(head.pid) + _listening(head.workers[0].pid)
        names = {name for name, _ in sockets}
        assert {"gcs_server", "raylet"} <= names, sockets
        exposed = [(name, addr) for name, addr in sockets if addr not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
        assert not exposed, f"listening beyond loopback: {exposed}"
        # the worker node works: a task that needs its resource runs, for a driver with the token
        code = ("import ray; ray.init(log_to_driver=False); "
                "print(ray.get(ray.remote(resources={'node-a': 1})(lambda: 'ran on node-a').remote()))")
        env = {**os.environ, **head.client_env()}
        p = subprocess.run([sys.executable, "-c", code], env=env, cwd=tempfile.gettempdir(), capture_output=True,
                           text=True, timeout=180)
        assert "ran on node-a" in p.stdout, p.stderr[-2000:]


def test_the_usage_report_goes_to_loopback_only(head, usage_reports, monkeypatch):
    """Ray's dashboard posts a "usage disabled" report even under --disable-usage-stats
    (to usage-stats.ray.io by default): the head's nodes send it to the URL their
    environment names, which is never beyond this machine."""
    from engine.local_head import _node_env

    deadline = time.monotonic() + 60
    while not usage_reports.posted and time.monotonic() < deadline:
        time.sleep(0.5)
    assert usage_reports.posted and b"schema_version" in usage_reports.posted[0]  # it obeys the variable
    for outside in ("https://usage-stats.ray.io/", ""):
        monkeypatch.setenv("RAY_USAGE_STATS_REPORT_URL", outside)
        assert _node_env(head.token_path)["RAY_USAGE_STATS_REPORT_URL"] == "http://127.0.0.1:9/"


def _listening(root_pid: int) -> list[tuple[str, str]]:
    root = psutil.Process(root_pid)
    procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    out = []
    for c in psutil.net_connections("inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in procs:
            try:
                name = procs[c.pid].name()
            except psutil.Error:
                continue
            out.append((name, c.laddr.ip))
    return out


def test_submitting_needs_the_dashboard_url():
    """Without a scheme Ray takes the address for a GCS and waits on it for a minute;
    nothing listening there is named at once."""
    from engine.errors import GrainflowError
    from engine.submit import job_client

    with pytest.raises(GrainflowError, match="http://HOST:PORT"):
        job_client("127.0.0.1:9")
    with pytest.raises(GrainflowError, match="no Ray dashboard answers at http://127.0.0.1:9"):
        job_client("http://127.0.0.1:9")
