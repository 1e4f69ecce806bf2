"""Serving cost on this machine: the Ray Serve application over HTTP versus the model alone.

ESCM trained one step (paper-sized on the prepared ED vocabulary when real data is given, the tiny
flavour on the embedded sample otherwise; replies capped at 30 tokens, which an untrained model uses up)
is logged and registered in a throwaway MLflow server (`cluster.local.services`), promoted to `champion`
and served as `edp serve` does (`cluster.local.serve.from_config` + `run`, Serve config
cluster/configs/serve/responders.yaml, app escm) on a local Ray (2 CPUs) at 127.0.0.1: two applications side by side,
`@serve.batch` on (the config's max_batch_size) and off (1), each pinned to one replica with 1 CPU
(autoscaling off, so batching is the only difference). Load: a fixed number of POST /v1/respond requests
from an asyncio httpx client in this process (loopback only) at each concurrency, the two settings
measured one after the other at each concurrency; latency is per request, client side.
Yardstick: `Responder.respond` called in-process on the same checkpoint (no HTTP, no Serve, 1 torch thread
like the replica) with 1 and max_batch_size requests per call.
Scale-up: a third application with the config's own autoscaling_config (max_replicas capped at 2 for 2
CPUs), idle on one replica, then a load step of 32 concurrent clients; the time until Serve reports a
second RUNNING replica (loaded from the registry, warmed up, in the routing table) and how many of the
requests sent meanwhile failed.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONTEXTS = [  # request bodies, cycled: different lengths so parsing and padding vary as in real traffic
    {"context": ["I finally passed my driving test today!"], "situation": None},
    {"context": ["I lost my wallet on the bus.", "Oh no! Did you find it?", "No, and it had my ID."],
     "situation": "I lost my wallet on the bus."},
    {"context": ["My dog has been sick all week and I am so worried about him."], "situation": None},
    {"context": ["We are moving to a new city next month.", "That sounds exciting!",
                 "It is, but I will miss my friends."], "situation": None},
    {"context": ["Someone ate my lunch from the office fridge again."], "situation": "my lunch was stolen"},
    {"context": ["I got the job offer I was hoping for!"], "situation": None},
    {"context": ["The storm knocked our power out last night and I could not sleep."], "situation": None},
    {"context": ["My sister surprised me with tickets to the concert.", "How nice of her!"],
     "situation": None},
]
MODEL = "escm-bench"


def quantiles(latencies_s: list[float]) -> dict:
    ms = np.asarray(latencies_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def in_process(checkpoint: Path, batch: int, calls: int) -> dict:
    """The yardstick: `calls` calls of `Responder.respond` with `batch` requests each."""
    from trainers.inference import Request, Responder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        responder = Responder.from_checkpoint(checkpoint)
        responder.warm_up()
        latencies, tokens = [], []
        t0 = time.perf_counter()
        for i in range(calls):
            requests = [Request(**CONTEXTS[(i * batch + j) % len(CONTEXTS)]) for j in range(batch)]
            t = time.perf_counter()
            out = responder.respond(requests)
            latencies.append(time.perf_counter() - t)
            tokens += [o.tokens_generated for o in out]
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"mode": f"in-process `Responder.respond`, {batch} per call", "batch": batch, "concurrency": None,
            "requests": calls * batch, "errors": 0, "wall_s": wall, "req_per_s": calls * batch / wall,
            "tokens": statistics.mean(tokens), **quantiles(latencies)}


async def timed_request(client, i: int) -> float | None:
    """Seconds one POST /v1/respond of CONTEXTS[i] took; None when it failed (non-200 or a transport error)."""
    import httpx

    t = time.perf_counter()
    try:
        ok = (await client.post("/v1/respond", json=CONTEXTS[i % len(CONTEXTS)])).status_code == 200
    except httpx.HTTPError:
        ok = False
    return time.perf_counter() - t if ok else None


async def _load(url: str, requests: int, concurrency: int) -> tuple[list[float], int, float]:
    """`requests` POSTs, at most `concurrency` in flight: (latencies of the 200s, errors, wall s)."""
    import httpx

    latencies: list[float] = []
    errors = 0
    queue = iter(range(requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in queue:
            seconds = await timed_request(client, i)
            if seconds is None:
                errors += 1
            else:
                latencies.append(seconds)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, trust_env=False) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return latencies, errors, time.perf_counter() - t0


def over_http(url: str, batch: int, concurrency: int, requests: int) -> dict:
    latencies, errors, wall = asyncio.run(_load(url, requests, concurrency))
    return {"mode": f"Ray Serve HTTP, batching {'on' if batch > 1 else 'off'} (max_batch_size {batch})",
            "batch": batch, "concurrency": concurrency, "requests": requests, "errors": errors,
            "wall_s": wall, "req_per_s": len(latencies) / wall, **quantiles(latencies or [float("nan")])}


def scale_up(spec, port: int, clients: int = 32, deadline_s: float = 120.0) -> dict:
    """Deploy `spec` with its autoscaling_config (max 2 replicas), idle on one; then a load step of
    `clients` concurrent clients: seconds until Serve reports 2 RUNNING replicas, requests and failures."""
    import threading

    from cluster.local import serve as serve_local
    from cluster.polling import poll_until

    auto = {**spec.deployment_options["autoscaling_config"], "min_replicas": 1, "max_replicas": 2}
    spec.deployment_options = {**spec.deployment_options, "autoscaling_config": auto,
                               "ray_actor_options": {"num_cpus": 0.5}}
    spec.app_name, spec.route_prefix = f"{spec.app_name}-autoscaled", "/autoscaled"
    url = serve_local.run(spec, port=port)

    def running() -> int:
        return serve_local.replica_states(spec.app_name).get("RUNNING", 0)

    stop, done = threading.Event(), {"requests": 0, "errors": 0}

    def load() -> None:
        async def main():
            import httpx

            async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False,
                                         limits=httpx.Limits(max_connections=clients)) as client:
                async def loop(i: int):
                    while not stop.is_set():
                        try:
                            ok = (await client.post("/v1/respond", json=CONTEXTS[i % len(CONTEXTS)])).status_code
                        except httpx.HTTPError:
                            ok = 0
                        done["requests"] += 1
                        done["errors"] += ok != 200
                await asyncio.gather(*(loop(i) for i in range(clients)))
        asyncio.run(main())

    if not poll_until(lambda: running() == 1, deadline_s, 0.2):
        raise RuntimeError(f"{spec.app_name}: no single RUNNING replica within {deadline_s:.0f} s: "
                           f"{serve_local.replica_states(spec.app_name)}")
    t0 = time.monotonic()
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    up_s = time.monotonic() - t0 if poll_until(lambda: running() >= 2, deadline_s, 0.2) else None
    stop.set()
    thread.join(timeout=120)
    return {"up_s": up_s, "clients": clients, "autoscaling": auto, **done}


def run(data: str = "sample", requests: int = 160, concurrencies: tuple[int, ...] = (1, 8, 32),
        in_process_requests: int = 80) -> dict:
    import ray
    from ray import serve

    from cluster.local import serve as serve_local
    from cluster.local.processes import free_port
    from cluster.local.services import start_mlflow
    from tests.integration.registry_models import register_champion, train_tiny
    from trainers.config import DataConfig, load_config
    from trainers.data.prepare import prepare

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    load = [os.getloadavg()[0]]
    rows, deploy_s = [], {}
    flavour = "tiny" if data == "sample" else "paper"
    with tempfile.TemporaryDirectory(prefix="edp-bench-serve-") as d:
        tmp = Path(d)
        prepared = prepare(load_config(DataConfig, source=data, n_process=2))
        # one training step: still untrained, so every reply runs to max_len (30 tokens), the worst case
        checkpoint, _ = train_tiny(prepared, tmp / "model", max_steps=1, max_len=30, flavour=flavour,
                                   source=data)
        on = serve_local.from_config(None, MODEL, "champion").args["max_batch_size"]
        rows += [in_process(checkpoint, b, max(1, in_process_requests // b)) for b in (1, on)]
        mlflow = start_mlflow(tmp / "mlflow")
        try:
            version = register_champion(mlflow.url, checkpoint, MODEL, 0.0, "bench-serve")
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            port = free_port()
            urls, apps = {}, []
            for batch in (on, 1):  # one app per setting, side by side (1 CPU each), measured interleaved
                spec = serve_local.from_config(None, MODEL, "champion",
                                               {"mlflow_tracking_uri": mlflow.url, "max_batch_size": batch})
                options = {k: v for k, v in spec.deployment_options.items() if k != "autoscaling_config"}
                spec.deployment_options = {**options, "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}
                spec.app_name, spec.route_prefix = f"{spec.app_name}-batch{batch}", f"/batch{batch}"
                apps.append(spec.app_name)
                t0 = time.perf_counter()
                urls[batch] = serve_local.run(spec, port=port)
                deploy_s[batch] = time.perf_counter() - t0
                over_http(urls[batch], batch, 8, 16)  # warm up the proxy, the replica and the connections
            rows += [over_http(urls[b], b, c, requests) for c in concurrencies for b in (on, 1)]
            for app in apps:  # free their CPUs for the scale-up measurement
                serve.delete(app)
            scaling = scale_up(serve_local.from_config(None, MODEL, "champion",
                                                       {"mlflow_tracking_uri": mlflow.url}), port)
        finally:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
            mlflow.stop()
    load.append(os.getloadavg()[0])
    return {"rows": rows, "deploy_s": deploy_s, "version": version, "load": load, "requests": requests,
            "tokens": rows[0]["tokens"], "flavour": flavour, "vocab": len(prepared.vocab), "scaling": scaling}


def as_markdown(r: dict) -> str:
    rows = r["rows"]
    by = {(x["batch"], x["concurrency"]): x for x in rows}
    alone = {x["batch"]: x for x in rows if x["concurrency"] is None}
    on = max(alone)
    model = "paper-sized (d=300)" if r["flavour"] == "paper" else "tiny"
    lines = [f"{r['requests']} requests per HTTP row ({r['tokens']:.0f}-token replies), {model} ESCM on a "
             f"{r['vocab']:,}-word vocabulary as `models:/{MODEL}@champion` v{r['version']}; Serve deploy (load "
             "from the registry + warm-up) "
             + ", ".join(f"{s:.1f} s (max_batch_size {b})" for b, s in r["deploy_s"].items())
             + f". Load average {r['load'][0]:.1f} at start, {r['load'][1]:.1f} at end.", "",
             "| mode | concurrency | requests/s | p50 ms | p95 ms | p99 ms | errors | compared with |",
             "|---|---|---|---|---|---|---|---|"]
    for x in rows:
        c = x["concurrency"]
        if c is None:
            vs = "yardstick" if x["batch"] == 1 else f"{x['req_per_s'] / alone[1]['req_per_s']:.1f}x batch 1"
        else:
            ref = alone[on if x["batch"] > 1 and c > 1 else 1]
            vs = f"{x['req_per_s'] / ref['req_per_s']:.2f}x in-process batch {ref['batch']}"
            if x["batch"] > 1 and (1, c) in by:
                off = by[(1, c)]
                vs = (f"{x['req_per_s'] / off['req_per_s']:.2f}x the throughput of batching off, "
                      f"p99 {x['p99_ms'] / off['p99_ms']:.2f}x; " + vs)
        lines.append(f"| {x['mode']} | {c or '-'} | {x['req_per_s']:.1f} | {x['p50_ms']:.0f} "
                     f"| {x['p95_ms']:.0f} | {x['p99_ms']:.0f} | {x['errors']} | {vs} |")
    if (1, 1) in by and (on, 1) in by:
        http = by[(1, 1)]["p50_ms"] - alone[1]["p50_ms"]
        wait = by[(on, 1)]["p50_ms"] - by[(1, 1)]["p50_ms"]
        lines += ["", f"At concurrency 1, HTTP + Serve add {http:+.0f} ms p50 to the model alone "
                      f"({alone[1]['p50_ms']:.0f} ms); batching on adds {wait:+.0f} ms more (a lone request "
                      "waits up to batch_wait_timeout_s for company)."]
    loaded = [c for c in sorted({x["concurrency"] for x in rows if x["concurrency"]}) if c > 1
              and (on, c) in by and (1, c) in by]
    if loaded:  # batching off is saturated from concurrency 8 on: more load only lengthens its queue
        c = loaded[-1]
        x, off = by[(on, c)], by[(1, c)]
        ratio, p99 = x["req_per_s"] / off["req_per_s"], x["p99_ms"] / off["p99_ms"]
        met = "met" if ratio >= 3 and p99 <= 1 else "NOT met"
        lines += ["", f"Target (issue 6: batching >= 3x throughput at equal p99): at concurrency {c} batching on "
                      f"serves **{ratio:.2f}x** the requests/s of batching off at **{p99:.2f}x** its p99 "
                      f"({x['req_per_s']:.1f} vs {off['req_per_s']:.1f} requests/s, p99 {x['p99_ms']:.0f} vs "
                      f"{off['p99_ms']:.0f} ms): {met}."]
    sc = r.get("scaling")
    if sc:
        a = sc["autoscaling"]
        up = "no second replica" if sc["up_s"] is None else f"**{sc['up_s']:.1f} s**"
        lines += ["", f"Load step to a second replica serving: {up} from the start of {sc['clients']} concurrent "
                      f"clients to 2 RUNNING replicas (the config's autoscaling: target_ongoing_requests "
                      f"{a['target_ongoing_requests']}, upscale_delay_s {a['upscale_delay_s']}, look_back_period_s "
                      f"{a.get('look_back_period_s', 30)}); {sc['requests']} requests meanwhile, "
                      f"{sc['errors']} failed."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(as_markdown(run(os.environ.get("ED_DATA_DIR") or "sample")))
