"""Benchmark moerl's built-in rollout engine against transformers' ``generate``, side by side.

    python tools/bench_rollout.py [--model DIR | --size tiny|small] [--batch 32]
                                  [--max-new-tokens 128] [--repeats 3] [--threads 1]
    python tools/bench_rollout.py --fleet [same options]

Prints one JSON object:

- ``throughput``: generated tokens per second (wall clock and per CPU second of this process,
  which is robust on a shared machine) for (a) ``model.generate`` (left-padded batch, sampling,
  KV cache, no route or mask recording: it cannot record them), (b) the built-in engine
  in-process with route capture and sampling-mask recording on, (c) the full path: built-in
  server in its own process + ``RolloutClient`` here (HTTP, JSON, decoding and validation; the
  CPU-seconds figure of (c) counts the client process only).
  Same model, same prompts, same ``max_new_tokens`` (EOS ignored, so both do equal work), same
  sampling parameters. The median (and best) of ``--repeats`` runs, alternating the
  contenders so that load from other processes hits all of them alike.
- ``ratio_engine_vs_generate``: (b) / (a), the goal is >= 1.0.
- ``wire``: bytes per generated token for routes (SGLang's base64 int32 over all hidden layers,
  and moerl's compact uint8 MoE-layers-only form) and masks (SGLang's JSON id lists, and moerl's
  varint-delta form), beside the raw information: ``L_moe * K * log2(E)`` bits per routed
  position, ``log2(C(V, k))`` bits for a kept set of size k. Routes cover prompt and response
  (``P + R - 1`` positions), so per generated token they include the prompt's share.

With ``--fleet``: generated tokens per second through ``moerl.rollout.fleet.Fleet`` with one
built-in server vs two (each its own process with ``--threads`` threads; ``--batch`` groups of 4
samples, routes and masks on, alternating the two set-ups over ``--repeats`` runs), and
``ratio_2_vs_1`` of the medians. On a machine with fewer free cores than servers the ratio
stays near 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

SIZES = {
    "tiny": {},  # moerl.tiny_model defaults: hidden 64, 3 layers, 8 experts top-2, vocab 64
    "small": dict(vocab_size=2048, hidden_size=256, intermediate_size=512,
                  moe_intermediate_size=128, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=32, num_experts=16, num_experts_per_tok=4,
                  max_position_embeddings=1024),
}


def make_prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, size=int(rng.integers(8, 24))).tolist()
            for _ in range(batch)]


def run_generate(model, prompts, sp, max_new) -> int:
    S = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, S - len(p):] = torch.tensor(p)
        mask[i, S - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                             temperature=sp["temperature"], top_k=sp["top_k"], top_p=sp["top_p"],
                             max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=0)
    return (out.shape[1] - S) * len(prompts)


def run_engine(engine, prompts, sp, max_new) -> int:
    from moerl.rollout.engine import GenerationRequest
    from moerl.rollout.sampler import SamplingSpec
    from moerl.rollout.schema import GenerateItem

    spec = SamplingSpec(temperature=sp["temperature"], top_k=sp["top_k"], top_p=sp["top_p"],
                        min_p=0.0, greedy=False, max_new_tokens=max_new,
                        stop_token_ids=frozenset(), ignore_eos=True, seed=None)
    outs, lock, done = [], threading.Lock(), threading.Event()

    def finished(out):
        with lock:
            outs.append(out)
            if len(outs) == len(prompts):
                done.set()
    engine.submit([GenerationRequest(item=GenerateItem(
        rid=str(i), prompt_ids=p, sampling=spec, return_logprob=True, return_routes=True,
        routes_start_len=0, return_mask=True, mask_mode="selected", compact=False), done=finished)
        for i, p in enumerate(prompts)])
    done.wait()
    return sum(len(o["output_ids"]) for o in outs)


def run_client(client, prompts, sp, max_new) -> int:
    samples = client.generate_sync(prompts, n=1, sampling_params={
        **sp, "max_new_tokens": max_new, "ignore_eos": True})
    return sum(len(s.response_ids) for s in samples)


def timed(fn) -> dict:
    gc.collect()  # garbage from one contender must not be collected on another's clock
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"tokens": tokens, "wall_s": wall, "cpu_s": cpu}


def wire_sizes(url: str, api_key: str | None, prompts, sp, max_new, layout) -> dict:
    """Bytes on the wire per generated token, SGLang format vs moerl's compact one."""
    import urllib.request

    from moerl.rollout.protocol import information_bits_per_token

    def generate(compact: bool) -> list[dict]:
        body = {"input_ids": prompts, "sampling_params": {**sp, "max_new_tokens": max_new,
                                                          "ignore_eos": True},
                "return_logprob": True, "return_routed_experts": True,
                "return_sampling_mask": True, "moerl_compact": compact}
        req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), headers={
            "Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    plain, compact = generate(False), generate(True)
    R = sum(len(o["output_ids"]) for o in plain)
    T = sum(len(p) + len(o["output_ids"]) - 1 for p, o in zip(prompts, plain))
    size = lambda outs, key: sum(len(json.dumps(o["meta_info"][key])) for o in outs)  # noqa: E731
    kept = [len(row) for o in plain for row in o["meta_info"]["output_token_sampling_mask"]]
    info = information_bits_per_token(layout=layout, kept_sizes=kept)
    return {
        "generated_tokens": R, "routed_positions": T, "mean_kept_ids": float(np.mean(kept)),
        "routes_bytes_per_generated_token": {
            "sglang_base64_int32_all_layers": size(plain, "routed_experts") / R,
            "moerl_compact_u8_moe_layers": size(compact, "moerl_routed_experts") / R,
            "raw_information": info["routes_bits"] / 8 * T / R},
        "mask_bytes_per_generated_token": {
            "sglang_json_id_lists": size(plain, "output_token_sampling_mask") / R,
            "moerl_compact_varint_delta": size(compact, "moerl_sampling_mask") / R,
            "raw_information": info["mask_bits"] / 8},
        "sampling_logprobs_json_bytes_per_generated_token":
            size(plain, "output_token_sampling_logprobs") / R,
        "output_token_logprobs_json_bytes_per_generated_token":
            size(plain, "output_token_logprobs") / R,
    }


def fleet_main(args, model_dir) -> None:
    """1 vs 2 built-in servers behind a Fleet (see the module docstring)."""
    from moerl.rollout.client import RolloutClient, run_sync
    from moerl.rollout.fleet import Fleet
    from moerl.rollout.launcher import launch_server

    servers = [launch_server(model_dir, num_threads=args.threads, max_batch_size=args.batch,
                             extra_args=("--prompt-cache-mb", "0")) for _ in range(2)]
    clients = [RolloutClient(s.url, api_key=s.api_key, concurrency=args.batch) for s in servers]
    prompts = make_prompts(args.batch, int(json.loads(
        (Path(model_dir) / "config.json").read_text())["vocab_size"]), seed=0)
    sp = {"temperature": 1.0, "top_k": args.top_k, "top_p": args.top_p,
          "max_new_tokens": args.max_new_tokens, "ignore_eos": True}

    def run(num: int) -> int:
        samples = run_sync(Fleet(clients[:num]).generate(
            prompts, n=4, sampling_params=sp, max_new_tokens=args.max_new_tokens, seed=0))
        return sum(len(s.response_ids) for s in samples)

    try:
        run(1), run(2)  # warm-up
        runs = {1: [], 2: []}
        for _ in range(args.repeats):
            for num in (1, 2):
                runs[num].append(timed(lambda: run(num)))
    finally:
        for server in servers:
            server.stop()
    rate = {num: statistics.median(r["tokens"] / r["wall_s"] for r in rs)
            for num, rs in runs.items()}
    print(json.dumps({"setup": {"model": str(model_dir), "groups": args.batch, "n": 4,
                                "max_new_tokens": args.max_new_tokens, "threads": args.threads,
                                "repeats": args.repeats},
                      "tokens_per_s_wall": {"servers_1": rate[1], "servers_2": rate[2]},
                      "ratio_2_vs_1": rate[2] / rate[1]}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF MoE checkpoint dir (default: create one of --size)")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--fleet", action="store_true", help="1 vs 2 built-in servers (a Fleet)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from transformers import AutoModelForCausalLM

    from moerl.rollout.client import RolloutClient
    from moerl.rollout.server import BackgroundServer, launch_server
    from moerl.tiny_model import create_tiny_hf_model

    model_dir = args.model or create_tiny_hf_model(
        Path(tempfile.mkdtemp(prefix="bench-rollout-")), seed=0, **SIZES[args.size])
    if args.fleet:
        return fleet_main(args, model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    server = BackgroundServer(model_dir, api_key="bench", max_batch_size=args.batch,
                              prompt_cache_bytes=0)
    # The full path runs the server in its own process, as deployed (trainer and rollout
    # server do not share an interpreter).
    remote = launch_server(model_dir, num_threads=args.threads, max_batch_size=args.batch,
                           extra_args=("--prompt-cache-mb", "0"))
    client = RolloutClient(remote.url, api_key=remote.api_key, concurrency=args.batch)
    vocab = hf.config.vocab_size
    prompts = make_prompts(args.batch, vocab, seed=0)
    sp = {"temperature": 1.0, "top_k": args.top_k, "top_p": args.top_p}
    n = args.max_new_tokens
    contenders = {
        "hf_generate": lambda: run_generate(hf, prompts, sp, n),
        "engine_routes_and_masks": lambda: run_engine(server.engine, prompts, sp, n),
        "http_server_and_client": lambda: run_client(client, prompts, sp, n),
    }
    for fn in contenders.values():  # warm-up
        fn()
    runs: dict[str, list[dict]] = {k: [] for k in contenders}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            runs[name].append(timed(fn))
    throughput = {name: {
        "tokens_per_s_wall": statistics.median(r["tokens"] / r["wall_s"] for r in rs),
        "tokens_per_s_wall_best": max(r["tokens"] / r["wall_s"] for r in rs),
        "tokens_per_cpu_s": statistics.median(r["tokens"] / r["cpu_s"] for r in rs),
        "tokens_per_run": rs[0]["tokens"]} for name, rs in runs.items()}
    wire = wire_sizes(remote.url, remote.api_key, prompts, sp, n, server.engine.layout)
    server.stop()
    remote.stop()
    ratio = {k: throughput["engine_routes_and_masks"][k] / throughput["hf_generate"][k]
             for k in ("tokens_per_s_wall", "tokens_per_s_wall_best", "tokens_per_cpu_s")}
    print(json.dumps({
        "setup": {"model": str(model_dir), "size": args.size if not args.model else "given",
                  "batch": args.batch, "max_new_tokens": n, "sampling": sp,
                  "threads": args.threads, "repeats": args.repeats,
                  "layout": server.engine.layout.to_json(),
                  "torch": torch.__version__, "transformers": transformers.__version__},
        "throughput": throughput, "ratio_engine_vs_generate": ratio,
        "ratio_http_vs_generate": throughput["http_server_and_client"]["tokens_per_s_wall"]
        / throughput["hf_generate"]["tokens_per_s_wall"],
        "wire": wire}, indent=2))


if __name__ == "__main__":
    main()
