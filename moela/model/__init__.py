"""The moela network: a DeepSeek-style decoder in Flax NNX.

Dimension letters, used in names (``x_btd``) and einsum strings throughout:

    B batch          T query time       S key time        D model width
    H query heads    G kv heads (GQA)   K qk head dim     V v head dim
    P rope dim       R kv latent rank   Q q latent rank   E experts
    F mlp hidden     N vocab            L layers          M routed rows (tokens x top-k)

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv_lora``,
``expert``, ``vocab``, ``layers``, ...); ``parallel`` maps them to mesh axes.
"""
