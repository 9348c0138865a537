"""The device mesh and the one table that maps logical axis names to mesh axes."""
from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes). Parameters name their dimensions with the left column.
RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),  # the stacked blocks of model.scan_layers
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known}) do not "
                       f"divide the {num_devices} devices; change the mesh.* sizes.")
    sizes[sizes.index(-1)] = num_devices // known
  total = math.prod(sizes)
  if total > num_devices or num_devices % total:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {total} devices, which must "
                     f"divide the {num_devices} available; change the mesh.* sizes.")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The data x fsdp x tensor mesh. A mesh smaller than the devices is refused when
  `mesh_cfg` sets `allow_unused_devices` False (as configs do), since idle accelerators are
  almost always a mistyped size.

  With `dcn_data` > 1 the data axis spans that many slices (TPU) or hosts (elsewhere, one
  process per host) over the data-center network, and every other axis stays inside one:
  `mesh_utils.create_hybrid_device_mesh`. Otherwise, off TPU (where jax orders devices by the
  chips' topology), devices are taken host by host, so the innermost axis, tensor, spans one
  host's devices whenever it fits in one."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  sizes = dict(zip(MESH_AXES, shape))
  if math.prod(shape) < len(devices) and not mesh_cfg.get("allow_unused_devices", True):
    raise ValueError(f"mesh {sizes} uses {math.prod(shape)} of the {len(devices)} devices; "
                     "set one of mesh.data, mesh.fsdp, mesh.tensor to -1 (the rest of the "
                     "devices), or mesh.allow_unused_devices=True to leave them idle.")
  types = (jax.sharding.AxisType.Auto,) * 3
  dcn = mesh_cfg.get("dcn_data", 1)
  if dcn > 1:
    return jax.sharding.Mesh(hybrid_devices(shape, dcn, devices), MESH_AXES, axis_types=types)
  if devices[0].platform != "tpu":
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices[:math.prod(shape)])


def hybrid_devices(shape, dcn: int, devices) -> np.ndarray:
  """Devices (data, fsdp, tensor) whose data axis is `dcn` granules (TPU slices, elsewhere
  processes) of data/dcn x fsdp x tensor devices each."""
  granule = "slice_index" if devices[0].platform == "tpu" else "process_index"
  granules = {getattr(d, granule) for d in devices}
  per = math.prod(shape) // dcn
  if shape[0] % dcn or len(granules) != dcn or len(devices) != dcn * per:
    where = "slices" if granule == "slice_index" else "processes (one per host)"
    raise ValueError(f"mesh.dcn_data={dcn} needs mesh.data ({shape[0]}) divisible by it and "
                     f"{dcn} {where} of {per} devices each; here {len(granules)} {where} hold "
                     f"{len(devices)} devices. Set mesh.dcn_data to the number of {where}.")
  return mesh_utils.create_hybrid_device_mesh(
      (shape[0] // dcn, shape[1], shape[2]), (dcn, 1, 1), devices,
      process_is_granule=granule == "process_index")


def hosts_per_tensor_group(mesh) -> int:
  """The most processes any one tensor-parallel group spans (1: each stays inside a host)."""
  groups = mesh.devices.reshape(-1, mesh.shape["tensor"])
  return max(len({d.process_index for d in g}) for g in groups)


def logical_to_spec(axes, shape, mesh, undivided: list | None = None) -> P:
  """PartitionSpec for a tensor whose dims carry `axes`; a dim that the mesh axis size does
  not divide (or whose mesh axis is already used) stays replicated, the former listed in
  `undivided` as (name, dim, mesh axes, their size)."""
  rules = dict(RULES)
  used, spec = set(), []
  for name, dim in zip(axes, shape):
    target = rules.get(name)
    names = () if target is None else (target if isinstance(target, tuple) else (target,))
    names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
    size = math.prod(mesh.shape[n] for n in names)
    if names and dim % size == 0:
      used.update(names)
      spec.append(names if len(names) > 1 else names[0])
    else:
      if names and undivided is not None:
        undivided.append((name, dim, names, size))
      spec.append(None)
  return P(*spec)


def param_shardings(abstract_state: nnx.State, mesh, undivided: list | None = None):
  """NamedShardings for a pure-dict params tree, from the `axes` metadata of an nnx.State.
  Parameters with a dimension their mesh axes do not divide (kept replicated there) are
  described in `undivided`, one line each."""
  def one(path, v):
    axes = v.get_metadata().get("axes") or (None,) * len(v.shape)
    mine = []
    spec = logical_to_spec(axes, v.shape, mesh, mine)
    if undivided is not None:
      name = ".".join(str(getattr(k, "key", k)) for k in path)
      undivided.extend(f"{name} {axis}={dim} over {'x'.join(names)}={size}"
                       for axis, dim, names, size in mine)
    return NamedSharding(mesh, spec)
  shardings = jax.tree_util.tree_map_with_path(
      one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(dict(RULES)["batch"]))


def data_parallel_size(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in dict(RULES)["batch"]]))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x, *axes):
  """Activations: `x` sharded by the logical names of its dims through the same RULES
  (batch -> data and fsdp, embed then left whole, heads and mlp -> tensor), under the mesh
  the caller traces with (`jax.sharding.use_abstract_mesh`, as the train step does); without
  one, `x` unchanged."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))
