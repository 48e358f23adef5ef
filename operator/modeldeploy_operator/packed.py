"""What the operator keeps per object for as long as it runs, in compact form: compressed JSON.

The indexes of the watched ModelDeployments, children and pods, and the last status written,
are kept for every ModelDeployment. As Python dicts a Deployment costs about five times its JSON
(a hash slot, a key string and a value object per field, at every level of nesting) and its JSON
three times its compressed JSON: at a few thousand ModelDeployments that was most of the
operator's memory. An object is unpacked only when it is read (a reconcile of its
ModelDeployment, a metrics round), which costs tens of microseconds; packing costs less than the
deep copy it replaces.
"""

from __future__ import annotations

import json
import zlib
from typing import NewType

from modeldeploy_operator import spec as api

Packed = NewType("Packed", bytes)


def pack(obj: api.Object) -> Packed:
    """`obj` as compressed JSON, its keys in their order (the same object packs the same)."""
    return Packed(zlib.compress(json.dumps(obj, separators=(",", ":")).encode(), 1))


def unpack(packed: Packed) -> api.Object:
    """A new object, equal to the one packed."""
    obj: api.Object = json.loads(zlib.decompress(packed))
    return obj
