"""The local SGLang launcher's environment (no SGLang needed): what trainer rank 0 must not pass on."""

from __future__ import annotations

from moerl.rollout.sglang_local import API_KEY_ENV, server_environment


def test_sglang_does_not_inherit_torchruns_worker_variables():
    """Launched from trainer rank 0 under torchrun, SGLang inherited TORCHELASTIC_USE_AGENT_STORE
    and hung in its own process-group rendezvous, as a client of a store nobody served."""
    worker = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
              "GROUP_RANK": "0", "ROLE_RANK": "0", "ROLE_NAME": "default", "GROUP_WORLD_SIZE": "1",
              "ROLE_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
              "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "none",
              "TORCHELASTIC_RESTART_COUNT": "0", API_KEY_ENV: "secret",
              "PATH": "/usr/bin", "OMP_NUM_THREADS": "1", "HOME": "/root"}
    assert server_environment(worker) == {"PATH": "/usr/bin", "OMP_NUM_THREADS": "1",
                                          "HOME": "/root"}
