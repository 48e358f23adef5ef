"""The data plane before a model is attached: alive, not ready, requests told to retry."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from modeldeploy_runtime import dataplane


def test_not_ready_and_unavailable_until_a_model_is_attached() -> None:
    plane = dataplane.DataPlane(name="iris", version="3")
    assert not plane.model_ready("iris")
    with pytest.raises(dataplane.UnavailableError, match="not loaded yet"):
        plane.model_metadata("iris")
    request = dataplane.InferenceRequest([dataplane.RequestInput("x", np.zeros((1, 4)))])
    with pytest.raises(dataplane.UnavailableError):
        asyncio.run(plane.infer("iris", None, request))


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "message"),
    [
        ("FP32", [2, -1], [0.0, 1.0], "shape must be a list of non-negative integers"),
        ("FP32", "2", [0.0, 1.0], "shape must be a list of non-negative integers"),
        (["FP32"], [2], [0.0, 1.0], "datatype ['FP32'] is not supported"),
        ("FP32", [3], b"\0" * 8, "8 bytes of data, but shape [3] of FP32 needs 12"),
    ],
)
def test_decode_tensor_names_the_problem(
    datatype: object, shape: object, data: object, message: str
) -> None:
    with pytest.raises(dataplane.InvalidInputError) as caught:
        dataplane.decode_tensor("x", datatype, shape, data)
    assert message in str(caught.value)
    assert "'x'" in str(caught.value)
