"""Model I/O: checkpoints (atomic saves, named errors), conversion of mmdetection weights, the
model zoo and export to TorchScript / ONNX."""
