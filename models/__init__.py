"""Model training pipelines (installed with the `train` extra: `pip install 'ferryman[train]'`).

Each model has a package here with its generator, its training entry point, the shipped .onnx and
its model card. The coordinator serves the .onnx with onnxruntime and, when it retrains, runs
`python -m models.<name>.train` in a child process.
"""
