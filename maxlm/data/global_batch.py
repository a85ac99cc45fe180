"""Host batch -> global jax.Arrays: each process hands over only its own rows."""

from __future__ import annotations

import jax
import numpy as np


def to_global(
    batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding
) -> dict[str, jax.Array]:
    """One global array per key from this process's rows, laid out by `sharding`."""
    arrays = {}
    for key, local in batch.items():
        try:
            arrays[key] = jax.make_array_from_process_local_data(sharding, local)
        except (ValueError, TypeError, IndexError) as err:
            raise ValueError(
                f"batch[{key!r}]: local shape {np.shape(local)} does not fit sharding "
                f"{sharding.spec} on mesh {dict(sharding.mesh.shape)} "
                f"({jax.process_count()} process(es)): {err}"
            ) from err
    return arrays
