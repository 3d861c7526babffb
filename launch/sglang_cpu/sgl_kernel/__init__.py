"""A pure-PyTorch stand-in for the ``sgl_kernel`` package, for SGLang 0.5.23 on a CPU without AMX.

Why: the ``sglang-kernel`` wheel on PyPI is CUDA-only and has no source release, and SGLang's CPU
path imports ``sgl_kernel`` unconditionally (``sglang/srt/mem_cache/allocation.py``: ``if _is_cpu:
from sgl_kernel import assign_req_to_token_pool_cpu``). On a CPU without AMX
(``cpu_has_amx_support()`` is false) every model layer falls back to plain PyTorch, and that one
symbol is the only kernel called. Any other symbol resolves to a function that raises when
called, naming itself, so a code path that would need a real kernel fails loudly instead of
computing something else. Installed by ``launch/setup_sglang.sh``; checked by
``launch/sglang_cpu/shims.py check``.
"""


TARGET_SGLANG = "0.5.23"
__version__ = "0.0.0+moerl.cpu.standin"


def assign_req_to_token_pool_cpu(
    req_pool_indices_B, req_to_token_RP, start_offset_B, end_offset_B, out_cache_loc_N, pool_len
):
    """Write each request's new KV-cache slots into its row of ``req_to_token``.

    Same semantics as the Triton kernel ``assign_req_to_token_pool`` in
    ``sglang/srt/mem_cache/allocation.py`` (0.5.23): request ``b`` gets
    ``req_to_token[req_pool_indices[b], start[b]:end[b]]`` set to the next ``end[b] - start[b]``
    entries of ``out_cache_loc``, requests consuming ``out_cache_loc`` in batch order.
    Legend: B requests, R pool rows, P = pool_len, N new slots.
    """
    assert req_to_token_RP.shape[1] == pool_len, (req_to_token_RP.shape, pool_len)
    rows = req_pool_indices_B.tolist()
    starts = start_offset_B.tolist()
    ends = end_offset_B.tolist()
    offset = 0
    for row, start, end in zip(rows, starts, ends):
        num_new = end - start
        req_to_token_RP[row, start:end] = out_cache_loc_N[offset:offset + num_new].to(
            req_to_token_RP.dtype
        )
        offset += num_new


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing_kernel(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} was called, but this is moerl's CPU stand-in for sgl_kernel "
            f"(launch/sglang_cpu/sgl_kernel), which implements only assign_req_to_token_pool_cpu. "
            f"This SGLang code path needs the real sgl-kernel (a CUDA or AMX CPU build)."
        )

    missing_kernel.__name__ = name
    return missing_kernel
