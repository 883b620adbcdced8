"""One process of tests/test_weights.py's two-process load: argv = coordinator, process id, the
official checkpoint, the report path."""
import json
import sys

import jax

jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ddt_jax import config_schema  # noqa: E402
from ddt_jax import convert  # noqa: E402
from ddt_jax import sharding  # noqa: E402
from ddt_jax import weights  # noqa: E402
from ddt_jax.models import ddt  # noqa: E402


def main(path: str, report_path: str) -> None:
    config = weights.read_model_config(path, num_encoder_blocks=3)
    mesh = sharding.create_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)))
    model = nnx.eval_shape(lambda: ddt.build_model(config, rngs=nnx.Rngs(0)))
    _, params = weights.split_params(model)
    shardings = sharding.logical_to_named(params, mesh, config_schema.default_config().mesh.rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            params.to_pure_dict(), shardings.to_pure_dict())
    loaded = weights.load_model_params(path, abstract, which="ema", num_encoder_blocks=3)
    want = nnx.state(convert.load_ddt(path, 3), nnx.Param).to_pure_dict()
    local = checked = 0
    for got, full in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)):
        for shard in got.addressable_shards:
            local += 1
            if np.array_equal(np.asarray(shard.data), np.asarray(full)[shard.index]):
                checked += 1
    kernel = loaded["blocks"][0]["mlp"]["w1"]["kernel"]
    rows = sorted({(s.index[0].start or 0) for s in kernel.addressable_shards})
    report = dict(process=jax.process_index(), global_devices=jax.device_count(),
                  local_shards=local, shards_checked=checked, kernel_rows=rows)
    with open(report_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[3], sys.argv[4])
