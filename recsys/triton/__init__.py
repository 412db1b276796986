"""Triton Inference Server: process management, the model repository, and the control client.

``server`` runs the tritonserver binary bundled with ``nvidia-pytriton`` (python backend only),
``repository`` publishes model versions into the repository atomically, and ``control`` loads,
pins, unloads and queries them over gRPC with the explicit model-control API.
"""
