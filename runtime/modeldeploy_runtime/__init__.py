"""modeldeploy runtime: serves one ONNX model over the Open Inference Protocol."""
