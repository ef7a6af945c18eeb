"""Device mesh, logical-axis rules and sharded initialisation (SPEC section 7).

Parameters carry logical axis names ('vocab', 'embed', 'mlp', 'heads', 'kv', 'layers');
`LOGICAL_RULES` maps them onto the mesh axes ('data', 'fsdp', 'tensor'). The train state
is created already sharded: `jax.eval_shape` gives the shapes, the rules give the
shardings, and `jax.jit(init, out_shardings=...)` allocates each shard where it lives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. FSDP shards the model dimension of every weight; tensor
# parallelism shards heads, MLP hidden units and the vocabulary.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
    # Activations: batch over the data axes (above), features unsharded, logits by vocab.
    ("length", None),
    ("act_embed", None),
    ("act_vocab", "tensor"),
)

BATCH_AXES = ("data", "fsdp")


def parse_mesh(spec: str) -> dict[str, int]:
  """'data=2,fsdp=-1,tensor=1' -> {'data': 2, 'fsdp': -1, 'tensor': 1} (one -1 allowed)."""
  sizes = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in MESH_AXES or name in sizes:
      raise ValueError(f"--mesh={spec!r}: expected comma-separated AXIS=SIZE with AXIS in "
                       f"{', '.join(MESH_AXES)} (each at most once), e.g. data=1,fsdp=-1,tensor=1")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"--mesh={spec!r}: size of {name!r} must be an integer or -1") from None
    if sizes[name] == 0 or sizes[name] < -1:
      raise ValueError(f"--mesh={spec!r}: size of {name!r} must be a positive integer or -1")
  if sum(v == -1 for v in sizes.values()) > 1:
    raise ValueError(f"--mesh={spec!r}: at most one axis may be -1")
  return {a: sizes.get(a, 1) for a in MESH_AXES}


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
  """Fill in the -1 axis so that the product is `num_devices`."""
  known = math.prod(v for v in sizes.values() if v != -1)
  if -1 in sizes.values():
    if num_devices % known:
      raise ValueError(f"--mesh: {num_devices} devices are not divisible by the fixed axes "
                       f"({known}); accepted: sizes whose product divides {num_devices}")
    return {a: (num_devices // known if v == -1 else v) for a, v in sizes.items()}
  if known != num_devices:
    raise ValueError(f"--mesh: axis sizes multiply to {known} but there are {num_devices} "
                     f"devices; accepted: a product of {num_devices} (or one axis = -1)")
  return dict(sizes)


def make_mesh(spec: str | dict[str, int] = "data=1,fsdp=-1,tensor=1",
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec) if isinstance(spec, str) else spec
  shape = resolve_mesh_shape(sizes, len(devices))
  dev = np.asarray(devices).reshape([shape[a] for a in MESH_AXES])
  return Mesh(dev, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree of `nn.LogicallyPartitioned` (abstract) leaves."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)
