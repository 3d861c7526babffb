"""Rollout side of moerl: SGLang's native /generate API, moerl's built-in server, weight sync.

- ``protocol``: the wire contract (SGLang 0.5.23 field names and encodings) and its validating
  decoders; ``MoeLayout``.
- ``client``: ``RolloutClient`` (async, retries, groups of ``n``) -> ``list[moerl.batch.Sample]``.
- ``server`` / ``engine`` / ``sampler`` / ``schema`` / ``weights``: the built-in server
  (``python -m moerl.rollout.server``) on a Hugging Face transformers MoE model.
- ``weight_sync``: trainer rank 0 pushes weights (distributed broadcast or safetensors on disk).

Submodules are imported explicitly; importing this package pulls in nothing heavy.
"""
