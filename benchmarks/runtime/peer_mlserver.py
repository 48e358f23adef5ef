"""The MLServer peer's custom runtime: ONNX Runtime behind MLServer's adaptive batching.

Its own module: importing MLServer registers protobuf symbols that clash with the
ones PyTriton's tritonclient registers, so the Triton peer must never import it.
"""

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from peers import session


class MLServerOnnx(MLModel):
    async def load(self) -> bool:
        self._session = session(self.settings.parameters.uri)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        y = self._session.run(None, {"x": x})[0]
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output("probabilities", y)]
        )
