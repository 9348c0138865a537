"""One process of the many-host mesh test (tests/test_distributed.py): 2 processes of 4 CPU
devices each, joined by jax.distributed, build the plain and the hybrid (DCN) meshes, check
where each axis runs, and reduce a global array over the hybrid mesh.

  python tests/mesh_worker.py OUT NUM_PROCESSES PROCESS_ID PORT

Process 0 writes OUT as JSON.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import join_processes  # noqa: E402


def processes(mesh):
  """The process index of every device, laid out as the mesh."""
  return np.vectorize(lambda d: d.process_index)(mesh.devices).tolist()


def main():
  out, nproc, pid, port = sys.argv[1:]
  jax.config.update("jax_num_cpu_devices", 4)
  join_processes(nproc, pid, port)
  from mdlm_jax import sharding  # pylint: disable=g-import-not-at-top

  # jax lists the devices interleaved across processes, so that taking them in listed order
  # would split every tensor pair between the two hosts
  devices = sorted(jax.devices(), key=lambda d: (d.id % 4, d.process_index))
  plain = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2), devices)
  hybrid = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=2, dcn_data=2), devices)
  errors = []
  for cfg in (dict(data=2, fsdp=2, tensor=2, dcn_data=4), dict(data=1, fsdp=4, tensor=2,
                                                                dcn_data=2)):
    try:
      sharding.make_mesh(cfg)
    except ValueError as e:
      errors.append(str(e))
  # a sum over the hybrid mesh: every row on its own data shard, reduced across the hosts
  rows = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
  spec = jax.sharding.NamedSharding(hybrid, jax.sharding.PartitionSpec("data"))
  local = [rows[i:i + 1] for i in range(4)]
  glob = jax.make_array_from_single_device_arrays(
      (4, 3), spec, [jax.device_put(local[idx[0].start], d)
                     for d, idx in spec.addressable_devices_indices_map((4, 3)).items()])
  total = jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=sharding.replicated(hybrid))(glob)
  if int(pid) == 0:
    with open(out, "w") as f:
      json.dump({"plain": processes(plain), "hybrid": processes(hybrid),
                 "plain_hosts_per_tensor": sharding.hosts_per_tensor_group(plain),
                 "listed_order_hosts_per_tensor": sharding.hosts_per_tensor_group(
                     jax.sharding.Mesh(np.asarray(devices).reshape(2, 2, 2),
                                       sharding.MESH_AXES)),
                 "hybrid_shape": dict(hybrid.shape), "errors": errors,
                 "sum": np.asarray(total).tolist(), "want": rows.sum(0).tolist()}, f)


if __name__ == "__main__":
  main()
