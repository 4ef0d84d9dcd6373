"""Generated gRPC/protobuf code for the KServe v2 / Open Inference Protocol as Triton serves it (package `inference`).

Sources: grpc_service.proto and model_config.proto from triton-inference-server/common (BSD-3-Clause, commit
83adf7cf88a2), unchanged but for the import path of model_config.proto (so the generated modules import as a package).
Triton's service is KServe v2's plus extensions (ModelConfig, which perf_analyzer reads), with the same package,
method names and field numbers, so KServe, Triton and tritonclient clients all speak to it.

Regenerate (`make protos`; tests/test_grpc.py checks the committed files are what this produces):

    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \\
        service/protos/model_config.proto service/protos/grpc_service.proto

The messages register as package `inference` in protobuf's default pool, as tritonclient's do: one process must not
import both (kserve#3099). The server never imports tritonclient; the tests run it from its own environment.
"""
