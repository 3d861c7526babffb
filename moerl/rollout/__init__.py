"""Rollout side of moerl: SGLang's native /generate API, moerl's built-in server, weight sync.

- ``protocol``: the wire contract (SGLang 0.5.23 field names and encodings) and its validating
  decoders; ``MoeLayout``. Both sides use it.

The trainer's side (imports neither the engine nor transformers; ``moerl.rollout_manager`` on top):

- ``client``: ``RolloutClient`` (async, retries, groups of ``n``) -> ``list[moerl.batch.Sample]``.
- ``fleet``: several servers as one generator; ``router``: SMG in front of them.
- ``launcher``: starts the built-in server as a subprocess; ``sglang`` / ``sglang_local``: what
  is checked about, and how to start, a real SGLang server.
- ``weight_sync``: trainer rank 0 pushes weights (distributed broadcast or safetensors on disk);
  its receiving half (``receive_tensors``) is the server's.

The server's side: ``server`` / ``engine`` / ``sampler`` / ``schema`` / ``weights`` /
``http_guard``, the built-in server (``python -m moerl.rollout.server``) on a Hugging Face
transformers MoE model.

Submodules are imported explicitly; importing this package pulls in nothing heavy.
"""
