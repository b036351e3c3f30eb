"""`alnet serve` under load: N concurrent clients post real cells; micro-batched against one-at-a-time, same run.

Starts `alnet serve` (a separate process, as users run it) on a checkpoint, posts the real cells of
tests/data/cnmc-mini from --clients concurrent clients (each waits for its answer before sending the next) and
times every request. The same service with --max-batch 1 (each request classified on its own, the unbatched
service) is measured in the same run, with --clients and with one client, in --rounds interleaved rounds. The
offline rate of the same checkpoint (`alnet predict`'s path: decoding in a pool, batches of 64) is the
yardstick: serve_ratio = throughput / batch rate. full_batch_ms is one forward pass of --max-batch decoded cells.
Without --checkpoint an untrained ALNet is saved (speed does not depend on the weights).

Prints one JSON line: throughput_rps, p50_ms, p95_ms, p99_ms, errors, server_peak_rss_mb (batched service,
--clients clients), batch_images_per_s, serve_ratio, full_batch_ms, p95_over_full_batch, speedup_over_unbatched,
one_client_p50_ratio (batched / unbatched), peak_bf16_gflops, peak_fp32_gflops, infer_efficiency (the served
rate's share of the peak of the checkpoint's precision; benchmarks/efficiency.py), batch_infer_efficiency, and every
setting's figures under "runs".
Usage: python benchmarks/serve_load.py [--checkpoint CKPT] [--clients 16] [--requests 16] [--max-batch 16]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import torch
from efficiency import efficiency, forward_flops, peak_for, peaks

from alnet.config import RunConfig
from alnet.data.transforms import load_image
from alnet.device import cpu_has_bf16
from alnet.infer.predict import load_pipeline, predict_files
from alnet.memory import keep_freed_memory
from alnet.train.module import CellClassifier

CELLS = Path(__file__).resolve().parents[1] / "tests" / "data" / "cnmc-mini"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(checkpoint: Path, max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-c", "from alnet.cli import app; app()", "serve", str(checkpoint), "--port",
               str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"alnet serve exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("alnet serve did not answer /health within 120 s")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(url: str, uploads: list[tuple[str, bytes]], clients: int, requests: int) -> tuple[list[float], int, float]:
    """`clients` threads, each posting `requests` cells one after another → (latencies s, errors, wall s)."""
    latencies, errors, guard = [], 0, threading.Lock()
    ready = threading.Barrier(clients + 1)

    def client(index: int):
        nonlocal errors
        with httpx.Client(timeout=120) as http:
            for name, data in uploads[:2]:  # warm-up: the connection, first passes through the model
                http.post(f"{url}/predict", files={"file": (name, data, "image/png")})
            ready.wait()
            for i in range(requests):
                name, data = uploads[(index * requests + i) % len(uploads)]
                start = time.perf_counter()
                try:
                    ok = http.post(f"{url}/predict", files={"file": (name, data, "image/png")}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                seconds = time.perf_counter() - start
                with guard:
                    latencies.append(seconds)
                    errors += not ok

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - start


def summary(latencies: list[float], errors: int, wall: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "throughput_rps": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "errors": errors}


def offline_rate(checkpoint: Path, files: list[Path], repeats: int = 2) -> tuple[int, float]:
    """Images classified and seconds taken by `alnet predict`'s path (decoding included)."""
    pipeline = load_pipeline(checkpoint)
    predict_files(pipeline, files)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        predict_files(pipeline, files)
    return repeats * len(files), time.perf_counter() - start


def full_batch_ms(checkpoint: Path, files: list[Path], max_batch: int) -> float:
    pipeline = load_pipeline(checkpoint)
    images = np.stack([load_image(files[i % len(files)], pipeline.preprocessing)[0] for i in range(max_batch)])
    pipeline.answer(images)  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        pipeline.answer(images)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="default: an untrained ALNet at --image-size")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16, help="measured requests per client and round")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every setting")
    args = parser.parse_args()
    keep_freed_memory()  # as every alnet command does (alnet.memory)
    files = sorted(p for p in CELLS.rglob("*") if p.suffix.lower() in {".png", ".bmp"})
    uploads = [(p.name, p.read_bytes()) for p in files]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(tmp) / "alnet.ckpt"
            module = CellClassifier(asdict(RunConfig(image_size=args.image_size)))
            torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, checkpoint)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # where the service runs its model
        machine = peaks(device)
        pipeline = load_pipeline(checkpoint, accelerator="cpu")
        flops = forward_flops(pipeline.trained.model, pipeline.preprocessing.size)
        mixed = pipeline.trained.config.get("precision", "auto") != "32" and (device == "cuda" or cpu_has_bf16())
        peak = peak_for(mixed, machine)
        # The machine may be shared: every setting is measured in each of --rounds rounds, interleaved, so that
        # a busy moment falls on all of them alike; figures pool the rounds.
        settings = [(args.clients, args.max_batch), (args.clients, 1), (1, args.max_batch), (1, 1)]
        services = {b: start_service(checkpoint, b, args.max_wait_ms) for b in (args.max_batch, 1)}
        pooled = {s: ([], 0, 0.0) for s in settings}
        offline_images, offline_seconds, batch_times = 0, 0.0, []
        try:
            for _ in range(args.rounds):
                for clients, max_batch in settings:
                    requests = args.requests if clients > 1 else 2 * args.requests
                    latencies, errors, wall = load(services[max_batch][1], uploads, clients, requests)
                    old = pooled[(clients, max_batch)]
                    pooled[(clients, max_batch)] = (old[0] + latencies, old[1] + errors, old[2] + wall)
                images, seconds = offline_rate(checkpoint, files)
                offline_images, offline_seconds = offline_images + images, offline_seconds + seconds
                batch_times.append(full_batch_ms(checkpoint, files, args.max_batch))
            rss = {b: round(peak_rss_mb(process.pid), 1) for b, (process, _) in services.items()}
        finally:
            for process, _ in services.values():
                process.terminate()
                process.wait(30)
    batch_rate, batch_ms = offline_images / offline_seconds, float(np.median(batch_times))
    runs = {f"{c}_clients_max_batch_{b}": {"clients": c, "max_batch": b, **summary(*pooled[(c, b)]),
                                            "server_peak_rss_mb": rss[b]} for c, b in settings}
    main_run = runs[f"{args.clients}_clients_max_batch_{args.max_batch}"]
    unbatched = runs[f"{args.clients}_clients_max_batch_1"]
    one, one_unbatched = runs[f"1_clients_max_batch_{args.max_batch}"], runs["1_clients_max_batch_1"]
    print(json.dumps({
        **{k: main_run[k] for k in ("clients", "throughput_rps", "p50_ms", "p95_ms", "p99_ms", "errors",
                                    "server_peak_rss_mb")},
        "batch_images_per_s": round(batch_rate, 1), "serve_ratio": round(main_run["throughput_rps"] / batch_rate, 2),
        "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "full_batch_ms": round(batch_ms, 1),
        "p95_over_full_batch": round(main_run["p95_ms"] / batch_ms, 2),
        "speedup_over_unbatched": round(main_run["throughput_rps"] / unbatched["throughput_rps"], 2),
        "one_client_p50_ratio": round(one["p50_ms"] / one_unbatched["p50_ms"], 2),
        **machine, **efficiency("infer", main_run["throughput_rps"], flops, peak),
        **efficiency("batch_infer", batch_rate, flops, peak),
        "threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0)), "runs": runs,
    }))


if __name__ == "__main__":
    main()
