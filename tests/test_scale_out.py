"""Scale-out past one server process: Ray Serve replicas (app/ray_serve.py, deploy/ray/) and nginx in front of
several `sedd serve` processes (deploy/nginx/nginx.conf, the compose profile `replicas`). Loopback only.

The Ray tests need the extra (`pip install 'sedd-serve[ray]'`, in the dev extra) and skip with a reason without
it. They start one local Ray instance in this process (2 CPUs, no dashboard, no usage report) with two
replicas of tiny-five, one torch thread each, and share it; they are marked slow (the instance takes 20-40 s
to start on a 2-core machine).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import tomllib
import yaml
from httpx_sse import EventSource

from helpers import TIMEOUT, compose_config, free_port, metric, parse_metrics

pytestmark = pytest.mark.timeout(240)

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO_ROOT / "deploy" / "ray" / "serve.yaml"
RAYSERVICE = REPO_ROOT / "deploy" / "ray" / "rayservice.yaml"
NGINX_CONF = REPO_ROOT / "deploy" / "nginx" / "nginx.conf"
HAS_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None
API_KEY = "scale-out-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


# ---- what some hosts lack ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_serve() -> None:
    if not HAS_RAY:
        pytest.skip("Ray Serve is not installed (pip install 'sedd-serve[ray]', in the dev extra)")


@pytest.fixture(scope="module")
def nginx() -> str:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    if binary is None:
        pytest.skip("no nginx binary (Debian: apt-get install nginx)")
    return binary


# ---- helpers ---------------------------------------------------------------------------------------
def timed_stream(client: httpx.Client, url: str, body: dict, headers: dict | None = None) -> dict:
    """One streamed request: the answering replica, every (event, data) and when each event arrived."""
    start = time.monotonic()
    with client.stream("POST", url, json={**body, "stream": True}, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events, arrived = [], []
        for event in EventSource(response).iter_sse():
            events.append((event.event, json.loads(event.data)))
            arrived.append(time.monotonic() - start)
    return {"replica": response.headers["x-replica-id"], "events": events, "arrived": arrived}


def check_unbuffered(result: dict) -> None:
    """The first `step` event reached the client long before the `done` event: nobody buffered the stream."""
    kinds = [kind for kind, _ in result["events"]]
    assert kinds[-1] == "done" and kinds[0] == "step", kinds
    first, last = result["arrived"][0], result["arrived"][-1]
    assert first < 0.5 * last, f"first event at {first:.3f} s, done at {last:.3f} s: the stream was buffered"


def expected_texts(model_dir: Path, bodies: list[dict]) -> list[list[str]]:
    """What sedd_core.generate gives for each body, here in this process (one torch thread: the replicas
    share the two cores)."""
    import torch

    import sedd_core

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm = sedd_core.load(str(model_dir), device="cpu")
        return [sedd_core.generate(lm, num_samples=1, steps=b["steps"], seed=b["seed"], predictor=b["predictor"])
                for b in bodies]
    finally:
        torch.set_num_threads(threads)


# ---- the CLI ----------------------------------------------------------------------------------------
def test_replicas_without_ray_is_refused():
    from sedd_cli.main import main

    assert main(["serve", "--replicas", "2"]) == 2


def test_ray_flag_without_the_extra_names_it(monkeypatch, capsys):
    from sedd_cli.main import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if it were not installed
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert main(["serve", "--ray", "--replicas", "2"]) == 2
    assert "pip install 'sedd-serve[ray]'" in capsys.readouterr().err


def test_the_command_line_imports_ray_only_to_serve_with_it():
    code = ("import sys, sedd_cli.main; sedd_cli.main.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'sedd_core'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- config files -----------------------------------------------------------------------------------
def serve_application() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]


def test_serve_config_is_valid_and_follows_the_limits(ray_serve):
    from ray.serve.schema import ServeDeploySchema

    from app.ray_serve import DEPLOYMENT_NAME, deployment_options
    from app.settings import Settings

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(config)  # Ray's own schema of `serve run` / `serve deploy` files
    app = serve_application()
    assert app["import_path"] == "app.ray_serve:build_app" and app["route_prefix"] == "/"
    settings = Settings(**app["args"])
    (deployment,) = app["deployments"]
    derived = deployment_options(settings, gpus=1, max_replicas=deployment["autoscaling_config"]["max_replicas"])
    assert deployment["name"] == DEPLOYMENT_NAME == derived["name"]
    for key in ("max_ongoing_requests", "max_queued_requests", "backpressure_config", "autoscaling_config",
                "ray_actor_options", "graceful_shutdown_timeout_s"):
        assert deployment[key] == derived[key], key
    assert deployment["autoscaling_config"]["target_ongoing_requests"] == settings.max_rows
    assert deployment["max_ongoing_requests"] >= settings.max_rows + settings.max_queue
    assert deployment["max_queued_requests"] == settings.max_queue
    assert deployment["backpressure_config"] == {"status_code": 503, "retry_after_s": 1}
    assert deployment["ray_actor_options"]["num_gpus"] == 1


def test_ray_health_check_is_the_model_readiness(ray_serve):
    import asyncio
    from types import SimpleNamespace

    from app.ray_serve import SEDDReplica
    from app.settings import Settings
    from app.state import ServerState

    state = ServerState(settings=Settings())
    replica = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(sedd=state)))
    for status, healthy in [("loading", False), ("ok", True), ("failed", False), ("draining", True)]:
        state.status = status
        if healthy:
            asyncio.run(SEDDReplica.check_health(replica))
        else:
            with pytest.raises(RuntimeError, match=status):
                asyncio.run(SEDDReplica.check_health(replica))
    state.status, state.engine = "ok", SimpleNamespace(alive=False)  # the engine's worker thread died
    with pytest.raises(RuntimeError, match="failed"):
        asyncio.run(SEDDReplica.check_health(replica))


def test_rayservice_manifest_serves_the_same_application(repo_root):
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config["applications"] == [serve_application()], "serveConfigV2 differs from deploy/ray/serve.yaml"
    if HAS_RAY:
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(serve_config)
    cluster = manifest["spec"]["rayClusterConfig"]
    pin = next(d for d in tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
               ["optional-dependencies"]["ray"] if d.startswith("ray[serve]"))
    assert cluster["rayVersion"] == pin.split("==")[1], "the cluster's Ray must be the version the extra pins"
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    deployment = serve_config["applications"][0]["deployments"][0]
    gpus = deployment["ray_actor_options"]["num_gpus"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == gpus
    assert workers["maxReplicas"] == deployment["autoscaling_config"]["max_replicas"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "replicas belong on the GPU workers"
    for group in [cluster["headGroupSpec"], workers]:
        for c in group["template"]["spec"]["containers"]:
            assert c["image"] and c["resources"]["limits"] == c["resources"]["requests"]


def render_nginx(tmp_path: Path, listen: int, upstreams: list[str]) -> Path:
    """deploy/nginx/nginx.conf with the compose service names replaced by loopback addresses and nginx's
    scratch paths in `tmp_path`; every other line as shipped."""
    text = NGINX_CONF.read_text()
    servers = re.findall(r"server (sedd-gpu\d+:8000)", text)
    assert len(servers) == 2, servers
    for name, address in zip(servers, upstreams, strict=True):
        text = text.replace(f"server {name} ", f"server {address} ")
    assert text.count("listen 8000;") == 1
    text = text.replace("listen 8000;", f"listen 127.0.0.1:{listen};")
    scratch = "".join(f"    {kind}_temp_path {tmp_path / kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                                  "uwsgi", "scgi"))
    text = text.replace("http {\n", "http {\n" + scratch, 1)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    return conf


def nginx_command(nginx: str, tmp_path: Path, conf: Path, *args: str) -> list[str]:
    return [nginx, "-p", str(tmp_path), "-c", str(conf), "-e", "stderr", "-g", f"pid {tmp_path / 'nginx.pid'};", *args]


def test_nginx_config_passes_nginx_t(tmp_path, nginx):
    text = NGINX_CONF.read_text()
    for directive in ("least_conn;", "proxy_buffering off;", "max_fails=", "fail_timeout=", "proxy_http_version 1.1;"):
        assert directive in text, directive
    read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", text).group(1))
    assert read_timeout >= 3600, "the read timeout must outlast the longest request"
    conf = render_nginx(tmp_path, free_port(), ["127.0.0.1:1", "127.0.0.1:2"])
    result = subprocess.run(nginx_command(nginx, tmp_path, conf, "-t"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_compose_replicas_profile_runs_one_gpu_each_behind_nginx(tmp_path, compose):
    config = compose_config(compose, tmp_path, "--profile", "replicas")
    services = config["services"]
    replicas = sorted(name for name in services if re.fullmatch(r"sedd-gpu\d+", name))
    assert replicas == ["sedd-gpu0", "sedd-gpu1"]
    devices = [services[name]["deploy"]["resources"]["reservations"]["devices"] for name in replicas]
    assert [d[0]["device_ids"] for d in devices] == [["0"], ["1"]], "one GPU per replica, each a different one"
    assert all(len(d) == 1 and "count" not in d[0] for d in devices)
    ids = [services[name]["environment"]["SEDD_REPLICA_ID"] for name in replicas]
    assert len(set(ids)) == len(ids)
    assert all(not services[name].get("ports") for name in replicas), "only nginx publishes a port"
    nginx = services["sedd-nginx"]
    assert nginx["profiles"] == ["replicas"]
    assert {(p["target"], str(p["published"])) for p in nginx["ports"]} == {(8000, "8000")}
    (mount,) = nginx["volumes"]
    assert Path(mount["source"]) == NGINX_CONF and mount["target"] == "/etc/nginx/nginx.conf" and mount["read_only"]
    assert set(nginx["depends_on"]) == set(replicas)
    upstreams = re.findall(r"server (sedd-gpu\d+):8000", NGINX_CONF.read_text())
    assert upstreams == replicas, "every replica service is an upstream of nginx, and only those"
    assert set(compose_config(compose, tmp_path)["services"]) == {"sedd"}, "the profile does not change `docker compose up`"


@pytest.mark.slow
def test_nginx_streams_across_two_servers(tmp_path, tiny_five, nginx, start_server):
    body = {"steps": 256, "seed": 7, "predictor": "analytic"}
    limits = {"max_rows": 8, "torch_threads": 1}
    with start_server(tiny_five, replica_id="left", **limits) as left, \
            start_server(tiny_five, replica_id="right", **limits) as right:
        port = free_port()
        conf = render_nginx(tmp_path, port, [left.removeprefix("http://"), right.removeprefix("http://")])
        proc = subprocess.Popen(nginx_command(nginx, tmp_path, conf, "-g", "daemon off;"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            base = f"http://127.0.0.1:{port}"
            _wait(lambda: httpx.get(base + "/health", timeout=2).status_code == 200, 20, proc)
            with httpx.Client(timeout=TIMEOUT) as client:
                results = [timed_stream(client, base + "/sample", body) for _ in range(4)]
                page = client.get(base + "/")
            for result in results:
                check_unbuffered(result)
            assert {r["replica"] for r in results} == {"left", "right"}, "least_conn spreads idle requests"
            assert len({r["events"][-1][1]["samples"][0]["text"] for r in results}) == 1, "one seed, one text"
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _wait(ready, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if ready():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready within {timeout} s")


# ---- Ray Serve: `sedd serve --ray` ------------------------------------------------------------------
@pytest.mark.slow
def test_sedd_serve_ray_starts_replicas_and_stops_ray_on_sigterm(tiny_five, tmp_path, ray_serve):
    port = free_port()
    env = {**os.environ, "SEDD_TORCH_THREADS": "1", "SEDD_LOG_LEVEL": "warning", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(tmp_path / "serve.log", "w+b")
    proc = subprocess.Popen([sys.executable, "-m", "sedd_cli", "serve", "--ray", "--replicas", "1",
                             "--model", str(tiny_five), "--device", "cpu", "--host", "127.0.0.1", "--port",
                             str(port), "--log-level", "warning"], cwd=REPO_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: httpx.get(base + "/health", timeout=2).status_code == 200, 150, proc)
        answer = httpx.post(base + "/sample", json={"steps": 8, "seed": 1}, timeout=TIMEOUT)
        assert answer.status_code == 200 and answer.headers["x-replica-id"]
        session = ["pgrep", "-s", str(proc.pid)]
        assert len(subprocess.run(session, capture_output=True).stdout.split()) > 2, "Ray's processes"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(base + "/health", timeout=2)
        # Ray's own processes (raylet, GCS, the replica) went with it: nothing is left in the session.
        time.sleep(1)
        assert subprocess.run(session, capture_output=True).stdout == b""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.seek(0)
        print(log.read().decode(errors="replace")[-3000:])


@pytest.mark.slow
def test_serve_run_with_the_config_file(tiny_five, tmp_path, ray_serve):
    """`serve run` on deploy/ray/serve.yaml (its builder, app.ray_serve:build_app), made to fit this machine:
    tiny-five on the CPU, one replica without a GPU, a loopback port. Ctrl-C (SIGINT) takes it down again."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"].update(model=str(tiny_five), device="cpu", torch_threads=1)
    del app["args"]["dtype"]
    deployment = app["deployments"][0]
    deployment["ray_actor_options"] = {"num_gpus": 0, "num_cpus": 0.5}
    deployment["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    serve_cli = Path(sys.executable).with_name("serve")
    log = open(tmp_path / "serve.log", "w+b")
    proc = subprocess.Popen([str(serve_cli), "run", str(tmp_path / "serve.yaml")], cwd=REPO_ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: httpx.get(base + "/health", timeout=2).status_code == 200, 150, proc)
        model = httpx.get(base + "/v1/model", timeout=TIMEOUT).json()
        assert model["name"] == "tiny-five" and model["max_rows"] == app["args"]["max_rows"]
        assert model["max_queue"] == app["args"]["max_queue"]
        assert httpx.post(base + "/sample", json={"steps": 8}, timeout=TIMEOUT).status_code == 200
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        with pytest.raises(httpx.TransportError):
            httpx.get(base + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.seek(0)
        print(log.read().decode(errors="replace")[-3000:])


# ---- Ray Serve: two replicas in this process --------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster(tiny_five, ray_serve):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from app import ray_serve

    port = free_port()
    overrides = {"model": str(tiny_five), "device": "cpu", "torch_threads": 1, "max_rows": 16, "max_queue": 32,
                 "api_key": API_KEY, "log_level": "warning"}
    ray_serve.start_local(overrides, replicas=2, host="127.0.0.1", port=port, num_cpus=2)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        ray_serve.stop_local()


def replica_pid(replica: str) -> int:
    import ray

    from app.ray_serve import APP_NAME, DEPLOYMENT_NAME

    actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{replica}", namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def running_replicas() -> int:
    from ray import serve

    from app.ray_serve import APP_NAME, DEPLOYMENT_NAME

    deployment = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    return deployment.replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_ray_sixteen_clients_json_and_sse_on_both_replicas(ray_cluster, tiny_five):
    bodies = [{"steps": 48, "seed": 300 + i, "predictor": "euler" if i % 3 else "analytic"} for i in range(16)]
    expected = expected_texts(tiny_five, bodies)
    barrier = threading.Barrier(len(bodies))

    def client(i: int) -> tuple[str, list[str]]:
        with httpx.Client(timeout=TIMEOUT, headers=AUTH) as http:
            barrier.wait()
            if i % 2:
                result = timed_stream(http, ray_cluster + "/sample", bodies[i])
                kind, done = result["events"][-1]
                assert kind == "done", result["events"][-1]
                return result["replica"], [s["text"] for s in done["samples"]]
            response = http.post(ray_cluster + "/sample", json=bodies[i])
            assert response.status_code == 200, response.text
            return response.headers["x-replica-id"], [s["text"] for s in response.json()["samples"]]

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(client, range(len(bodies))))
    assert [texts for _, texts in answers] == expected
    assert len({replica for replica, _ in answers}) == 2, "both replicas served requests"


@pytest.mark.slow
def test_ray_a_seed_gives_the_same_text_on_either_replica(ray_cluster):
    body = {"steps": 32, "seed": 4242, "num_samples": 2}
    by_replica: dict[str, set] = {}
    with httpx.Client(timeout=TIMEOUT, headers=AUTH) as http:
        for _ in range(30):
            response = http.post(ray_cluster + "/sample", json=body)
            assert response.status_code == 200, response.text
            texts = tuple(s["text"] for s in response.json()["samples"])
            by_replica.setdefault(response.headers["x-replica-id"], set()).add(texts)
            if len(by_replica) == 2:
                break
    assert len(by_replica) == 2, f"30 requests all went to {set(by_replica)}"
    assert len(set.union(*by_replica.values())) == 1, by_replica


@pytest.mark.slow
def test_ray_streams_are_not_buffered_and_the_page_loads(ray_cluster):
    with httpx.Client(timeout=TIMEOUT, headers=AUTH) as http:
        check_unbuffered(timed_stream(http, ray_cluster + "/sample", {"steps": 256, "seed": 1, "stream_every": 1}))
        page = http.get(ray_cluster + "/")
        model = http.get(ray_cluster + "/v1/model")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "<html" in page.text.lower()
    assert model.status_code == 200 and model.json()["replica"] == model.headers["x-replica-id"]


@pytest.mark.slow
def test_ray_keeps_the_api_key(ray_cluster):
    response = httpx.post(ray_cluster + "/sample", json={"steps": 4}, timeout=TIMEOUT)
    assert response.status_code == 401, response.text
    assert httpx.get(ray_cluster + "/health", timeout=TIMEOUT).status_code == 200


@pytest.mark.slow
def test_ray_overload_answers_503_with_retry_after(ray_cluster):
    """More full-width requests than both replicas admit (each: one 16-row request running, SEDD_MAX_QUEUE=32
    waiting; max_ongoing_requests lets that many through): the surplus is refused at once with the replica's
    503 and Retry-After, not piled up. The rest are then cancelled."""
    import asyncio

    async def overload() -> tuple[list[int], httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=TIMEOUT, headers=AUTH, limits=limits) as http:
            tasks = []
            for i in range(90):  # a quick ramp, not one burst: Ray's proxy refuses more than
                # max_queued_requests (32) that arrive before it has handed them to a replica
                tasks.append(asyncio.create_task(http.post(ray_cluster + "/sample",
                                                           json={"num_samples": 16, "steps": 1024, "seed": i})))
                await asyncio.sleep(0.02)
            before, refused = [], None
            for next_done in asyncio.as_completed(tasks):
                response = await next_done
                if response.status_code == 503:
                    refused = response
                    break
                before.append(response.status_code)
            for task in tasks:  # the clients leave; the replicas drop their requests
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return before, refused

    before, refused = asyncio.run(overload())
    assert refused is not None, "no request was refused"
    assert set(before) <= {200}, before
    assert int(refused.headers["retry-after"]) >= 1
    assert "busy" in refused.json()["detail"], refused.text  # the replica's own answer, past its queue
    assert refused.headers["x-replica-id"]
    wait_until_idle(ray_cluster)


def wait_until_idle(base: str, timeout: float = 90.0) -> None:
    """Until both replicas report no running rows and no waiting requests on /metrics."""
    idle: set[str] = set()

    def both_idle() -> bool:
        response = httpx.get(base + "/metrics", headers=AUTH, timeout=TIMEOUT)
        values = parse_metrics(response.text)
        replica = response.headers["x-replica-id"]
        if metric(values, "sedd_running_rows") == 0 and metric(values, "sedd_queue_depth") == 0:
            idle.add(replica)
        else:
            idle.discard(replica)
        return len(idle) == 2

    _wait(both_idle, timeout)


@pytest.mark.slow
def test_ray_killed_replica_fails_its_requests_and_is_replaced(ray_cluster):
    body = {"steps": 1024, "stream_every": 8}
    results: dict[int, dict] = {}
    started = threading.Semaphore(0)

    def streaming_client(i: int) -> None:
        outcome = results[i] = {"replica": None, "events": [], "error": None}
        try:
            with httpx.Client(timeout=TIMEOUT, headers=AUTH) as http, \
                    http.stream("POST", ray_cluster + "/sample", json={**body, "seed": i, "stream": True}) as r:
                outcome["replica"] = r.headers.get("x-replica-id")
                for event in EventSource(r).iter_sse():
                    if not outcome["events"]:
                        started.release()
                    outcome["events"].append(event.event)
        except httpx.HTTPError as exc:  # a cut stream: the replica is gone
            outcome["error"] = exc

    def json_client(i: int) -> None:
        with httpx.Client(timeout=TIMEOUT, headers=AUTH) as http:
            response = http.post(ray_cluster + "/sample", json={**body, "seed": i})
        results[i] = {"replica": response.headers.get("x-replica-id"), "status": response.status_code,
                      "text": response.text}

    # Started together, so that Ray's routing (fewest ongoing requests) spreads both kinds over both replicas.
    threads = [threading.Thread(target=client, args=(i,))
               for i in range(12) for client in [streaming_client if i % 2 else json_client]]
    for thread in threads:
        thread.start()
    for _ in range(6):  # every stream is running
        assert started.acquire(timeout=60)
    streams = [results[i] for i in range(1, 12, 2)]
    replicas = {r["replica"] for r in streams}
    assert len(replicas) == 2, streams
    victim = sorted(replicas)[0]
    os.kill(replica_pid(victim), signal.SIGKILL)
    killed_at = time.monotonic()
    for thread in threads:
        thread.join(timeout=90)
        assert not thread.is_alive(), "a request hung after its replica died"
    print(f"all requests ended {time.monotonic() - killed_at:.1f} s after the kill")
    on_victim = [r for r in streams if r["replica"] == victim]
    on_survivor = [r for r in streams if r["replica"] != victim]
    assert on_victim and on_survivor
    for r in on_survivor:
        assert r["events"][-1] == "done" and r["error"] is None, r
    for r in on_victim:  # a clear end: the connection cut or an `error` event, never a `done`
        assert "done" not in r["events"], r
        assert r["error"] is not None or r["events"][-1] == "error", r
        print(f"stream on the killed replica: {len(r['events'])} events, then {r['error']!r}")
    for r in (results[i] for i in range(0, 12, 2)):  # JSON: the survivor's answer, or a 5xx from the proxy
        print(f"JSON request: {r['status']} from {r['replica']}: {r['text'][:200]!r}")
        if r["status"] == 200:
            assert r["replica"] != victim
        else:
            assert r["status"] >= 500 and r["text"], r

    # Ray starts a replacement, which loads the model and serves.
    seen: set[str] = set()

    def new_replica_answers() -> bool:
        response = httpx.post(ray_cluster + "/sample", json={"steps": 8, "seed": 1}, headers=AUTH, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        seen.add(response.headers["x-replica-id"])
        return bool(seen - replicas)

    _wait(new_replica_answers, 120)
    print(f"a new replica answered {time.monotonic() - killed_at:.1f} s after the kill")
    assert victim not in seen
    assert running_replicas() == 2
