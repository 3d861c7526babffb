"""Host collectives under the process groups ``init_parallel`` builds when CUDA is reported present.

Run under torchrun (2 processes, CPU). NCCL is absent from CPU builds of torch, so a stand-in
backend registered for CUDA tensors only takes its place: like NCCL, it has no way to carry a host
tensor. ``--backend default`` uses ``default_backend`` (the fixed init); ``--backend cuda-only``
makes the default group the CUDA backend alone (the init before the fix). Each host collective of
the loop is run; prints one JSON line: which collectives passed and the first error.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

STAND_IN = "cudaonly"


def _register_stand_in() -> None:
    def create(store, rank, size, timeout):
        return dist.ProcessGroupGloo(store, rank, size, timeout)

    dist.Backend.register_backend(STAND_IN, create, devices=["cuda"])


def _samples():
    from moerl.batch import Sample

    out = []
    for b in range(4):
        prompt, response = [1, 2, 3 + b], [4 + b] * (b + 1)
        routes = torch.randint(0, 8, (len(prompt) + len(response) - 1, 2, 2), dtype=torch.int32,
                               generator=torch.Generator().manual_seed(b))
        out.append(Sample(group_index=b // 2, sample_index=b % 2, prompt_ids=prompt,
                          response_ids=response, rollout_logprobs_R=-torch.rand(len(response)),
                          full_logprobs_R=-torch.rand(len(response)), finish_reason="stop",
                          routes_TLK=routes, reward=float(b)))
    return out


def _host_collectives(layout, groups) -> dict:
    from moerl.batch import broadcast_batch, broadcast_json, pack_samples
    from moerl.data_parallel import DataParallel

    dp = DataParallel.from_layout(layout, groups)
    steps = {
        "broadcast_json": lambda: broadcast_json({"a": 1}, src=0, group=groups.world),
        "broadcast_batch": lambda: broadcast_batch(
            pack_samples(_samples(), pad_id=0) if layout.rank == 0 else None, src=0,
            group=groups.world),
        "dp.gather_rows": lambda: dp.gather_rows(torch.full((4, 3), float(dp.rank))),
        "dp.reduce_metrics": lambda: dp.reduce_metrics({"loss": float(dp.rank)}),
    }
    passed, error = [], None
    for name, fn in steps.items():
        try:
            fn()
        except RuntimeError as err:
            error = f"{name}: {err}"
            break
        passed.append(name)
    return {"passed": passed, "error": error}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("default", "cuda-only"), required=True)
    args = parser.parse_args()
    _register_stand_in()
    torch.cuda.is_available = lambda: True  # what init_parallel sees on a GPU machine
    torch.cuda.set_device = lambda device: None
    import moerl.trainer.parallel as parallel
    from megatron.core import tensor_parallel

    parallel.CUDA_BACKEND = STAND_IN
    if args.backend == "cuda-only":
        parallel.default_backend = lambda *, cuda: STAND_IN
    # The CUDA RNG tracker needs a real device; seeding is not what this check is about.
    tensor_parallel.model_parallel_cuda_manual_seed = lambda seed: None
    layout, groups = parallel.init_parallel(tp=1, ep=2, etp=1, seed=0, timeout_s=60)
    result = _host_collectives(layout, groups)
    result["backend"] = dist.get_backend_config()
    result["dp_backend"] = dist.get_backend_config(groups.dp)
    if layout.rank == 0:
        print(json.dumps(result), flush=True)
    # No destroy: after a failed collective the peers may be out of step.


if __name__ == "__main__":
    main()
