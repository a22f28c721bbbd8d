"""Two real JAX processes (jax.distributed on localhost, 2 CPU devices each): every process
loads only its rows of the global batch, the assembled global array is the batch a single
process would have built, and the two processes' data shards read disjoint records whose union
is the whole dataset."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from tests.packing_reference import pack_documents

ROOT = Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import jax
    jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id=int(sys.argv[1]))
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from moela.configs.schema import MeshConfig
    from moela.data.pipeline import process_span, to_global
    from tests.packing_reference import pack_documents
    from moela.parallel.layout import Layout
    from moela.parallel.mesh import build_mesh
    from moela.parallel.sharded import batch_sharding

    rows = pack_documents([[i % 50 + 4] * 7 for i in range(40)], 8, eos_id=3)
    sharding = batch_sharding(Layout.of(build_mesh(MeshConfig()), "dp"))
    span = process_span(sharding, (8, 8))
    local = rows.take(slice(8 + span[0], 8 + span[1])).as_batch()
    batch = to_global(local, sharding, 8)
    weighted = jax.jit(lambda x: jnp.sum(x * jnp.arange(1, 9)[:, None]))(batch["inputs"])  # row-order aware
    full = multihost_utils.process_allgather(batch["inputs"], tiled=True)
    from moela.configs import load
    from moela.data.pipeline import default_shards
    from moela.data.sources import open_sources
    from moela.data.stream import documents, ordered

    (source,) = open_sources(load("tiny", ["data.dataset=jsonl:" + sys.argv[2]]).data, "train")
    shards, shard = default_shards(span, 8), jax.process_index()
    docs = documents(ordered([source], [1.0], 3, None), shard, shards, 0, 0, 4)
    records = [next(docs) for _ in range(len(range(shard, len(source), shards)))]  # this shard's epoch
    print(json.dumps({{"span": list(span), "local_rows": len(local["inputs"]), "weighted": int(weighted),
                      "full": full.tolist(), "devices": jax.device_count(), "shards": shards,
                      "records": records}}))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_assemble_the_same_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), port=free_port()))
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(41)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(corpus)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    rows = pack_documents([[i % 50 + 4] * 7 for i in range(40)], 8, eos_id=3)
    expected = rows.inputs[8:16]
    assert sorted(tuple(o["span"]) for o in outs) == [(0, 4), (4, 8)]
    for o in outs:
        assert o["devices"] == 4 and o["local_rows"] == 4
        np.testing.assert_array_equal(np.asarray(o["full"]), expected)
        assert o["weighted"] == int(np.sum(expected * np.arange(1, 9)[:, None]))
        assert o["shards"] == 2
    first, second = (set(o["records"]) for o in sorted(outs, key=lambda o: o["span"]))
    assert (len(first), len(second)) == (21, 20) and not first & second  # 41 records: 21 + 20, disjoint
    assert first | second == {f"record {i}" for i in range(41)}
