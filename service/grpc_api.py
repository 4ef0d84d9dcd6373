"""gRPC front-end: the standard ``inference.GRPCInferenceService`` (KServe v2 / Open Inference Protocol, as Triton
serves it) plus ``grpc.health.v1`` for Kubernetes probes and server reflection for ``grpcurl``.

It runs inside the BentoML worker on the worker's own event loop (``grpc.aio``): the batcher's futures belong to that
loop, so gRPC and HTTP requests join the same batches through the same :class:`service.classifier.Classifier`. It
starts in the service's startup hook, turns NOT_SERVING when the drain begins (new calls get UNAVAILABLE from the
classifier, in-flight ones are answered) and stops in the shutdown hook. Implemented: ServerLive, ServerReady,
ModelReady, ServerMetadata, ModelMetadata, ModelInfer and Triton's ModelConfig; the other Triton RPCs answer
UNIMPLEMENTED. Parsing and rendering only: the protocol lives in ``service/kserve_v2.py``, the error codes in
``service/errors.py``.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import kserve_v2, metrics
from service.auth import OPEN_GRPC_SERVICES, ApiKeys
from service.classifier import Classifier
from service.errors import InvalidParameter, MalformedRequest, ServiceError, Unauthenticated, error_message, grpc_code
from service.protos import grpc_service_pb2 as pb
from service.protos import grpc_service_pb2_grpc as pb_grpc
from service.request_scope import RequestScope
from service.settings import Settings

log = logging.getLogger("vitserve.grpc")
PROTOCOL = metrics.V2_GRPC
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """The one way this front-end answers an error: the code from the error table, retry advice as metadata."""
    if isinstance(exc, ServiceError) and exc.retry_after_s is not None:
        seconds = max(1, round(exc.retry_after_s))
        # grpc-retry-pushback-ms is what gRPC's own retry policy honours; retry-after for everyone else.
        context.set_trailing_metadata((("retry-after", str(seconds)), ("grpc-retry-pushback-ms", str(seconds * 1000))))
    await context.abort(grpc.StatusCode[grpc_code(exc)], error_message(exc))


class Undecodable:
    """A request message protobuf could not parse. gRPC's own deserializer raising would answer UNKNOWN with the
    Python exception's text (a 5xx for a client's mistake); this stands in for the message, and the method answers
    INVALID_ARGUMENT from the error table instead."""

    def __init__(self, message_type: str, error: Exception):
        self.error = MalformedRequest(f"the request is not a valid {message_type} message: {error}")


def decode(message_class):
    """``message_class.FromString`` that returns :class:`Undecodable` instead of raising."""

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as e:
            return Undecodable(message_class.DESCRIPTOR.full_name, e)

    return parse


def _answer_undecodable(behaviour):
    async def call(request, context):
        if isinstance(request, Undecodable):
            if behaviour.__name__ == "ModelInfer":  # the one counted RPC
                metrics.record_outcome(PROTOCOL, request.error, 0.0)
            await abort(context, request.error)
        return await behaviour(request, context)

    return call


class _Captured:
    """Stands in for a server to receive the generated stubs' method handlers (``add_*_to_server``)."""

    def add_generic_rpc_handlers(self, handlers) -> None: ...

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = handlers


def add_servicer(servicer, server) -> None:
    """The generated registration, with every unary method's request parsed by :func:`decode` (the generated stubs
    take ``FromString`` as is). Streaming methods keep the generated handlers."""
    captured = _Captured()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, captured)
    handlers = dict(captured.handlers)
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        if method.client_streaming or method.server_streaming:
            continue
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _answer_undecodable(getattr(servicer, method.name)), request_deserializer=decode(request),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _param(p: pb.InferParameter):
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def parse_request(request: pb.ModelInferRequest) -> tuple[list[kserve_v2.Tensor], list[kserve_v2.RequestedOutput]]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidParameter(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; they must match one to one")
    inputs = []
    for i, t in enumerate(request.inputs):
        shape = list(t.shape)
        if raw:
            inputs.append(kserve_v2.tensor_from_raw(t.name, t.datatype, shape, raw[i]))
        elif t.datatype == "BYTES":
            inputs.append(kserve_v2.tensor_from_values(t.name, t.datatype, shape, list(t.contents.bytes_contents)))
        else:
            inputs.append(kserve_v2.tensor_from_values(t.name, t.datatype, shape, t.contents.fp32_contents))
    outputs = []
    for o in request.outputs:
        k = _param(o.parameters["classification"]) if "classification" in o.parameters else None
        if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
            raise InvalidParameter(f"classification must be an integer, got {k!r}")
        outputs.append(kserve_v2.RequestedOutput(o.name, k))
    return inputs, outputs


def render_response(model: kserve_v2.Model, request_id: str, tensors: list[kserve_v2.Tensor], parameters: dict) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request_id)
    for t in tensors:
        response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        response.raw_output_contents.append(kserve_v2.raw(t))  # tritonclient reads raw outputs, as Triton sends them
    for key, value in parameters.items():
        response.parameters[key].string_param = value
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, clf: Classifier):
        self.clf = clf
        self.model = kserve_v2.Model(clf)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.clf.ready)

    async def ModelReady(self, request, context):
        try:
            self.model.check(request.name, request.version)
        except ServiceError as exc:
            await abort(context, exc)
        return pb.ModelReadyResponse(ready=self.clf.ready)

    async def ServerMetadata(self, request, context):
        from service import __version__

        return pb.ServerMetadataResponse(name="vitserve", version=__version__, extensions=list(kserve_v2.EXTENSIONS))

    async def ModelMetadata(self, request, context):
        try:
            self.model.check(request.name, request.version)
        except ServiceError as exc:
            await abort(context, exc)
        m = self.model.metadata()
        return pb.ModelMetadataResponse(
            name=m["name"], versions=m["versions"], platform=m["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in m["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in m["outputs"]],
        )  # fmt: skip

    async def ModelConfig(self, request, context):
        from google.protobuf import json_format

        from service.protos import model_config_pb2

        try:
            self.model.check(request.name, request.version)
        except ServiceError as exc:
            await abort(context, exc)
        config = json_format.ParseDict(self.model.config(), model_config_pb2.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    async def ModelInfer(self, request, context):
        # The door (service/request_scope.py) before the tensors are parsed or decoded; the client's gRPC deadline is
        # its own timeout. (gRPC has read the message by now: its size is bounded by the receive limit.)
        try:
            with RequestScope(self.clf, PROTOCOL, context.time_remaining) as scope:
                self.model.check(request.model_name, request.model_version)
                inputs, outputs = parse_request(request)
                tensors, result = await kserve_v2.infer(self.model, inputs, outputs, PROTOCOL, ticket=scope.ticket)
                scope.answered = True
                return render_response(self.model, request.id, tensors, kserve_v2.response_parameters(result))
        except ServiceError as exc:  # counted by the scope; answered here with the table's code
            await abort(context, exc)


class _ApiKeyCheck(grpc.aio.ServerInterceptor):
    """Refuse a call without a valid key before its request message is even deserialised."""

    def __init__(self, keys: ApiKeys):
        self.keys = keys

    async def intercept_service(self, continuation, details):
        if not self.keys.enabled or details.method.startswith(OPEN_GRPC_SERVICES):
            return await continuation(details)
        try:
            self.keys.check(dict(details.invocation_metadata or ()).get("authorization"))
        except Unauthenticated as exc:
            if details.method.endswith("/ModelInfer"):
                metrics.record_outcome(PROTOCOL, exc, 0.0)
            return _refusal(exc.message)
        return await continuation(details)


def _refusal(message: str) -> grpc.RpcMethodHandler:
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(refuse)  # no deserializer: the message stays unread bytes


def _server(settings: Settings, interceptors: list):
    """The server that terminates gRPC (``VITSERVE_GRPC_TRANSPORT``): the C++ front when it is built (or required),
    else grpc.aio in this worker. Either runs the same handlers on this worker's loop."""
    from service import grpc_native

    if grpc_native.transport(settings) == "native":
        server = grpc_native.NativeServer(grpc_native.find_binary(), interceptors, max_receive_bytes=settings.max_body_bytes)
        return server, "native"
    options = [
        ("grpc.max_receive_message_length", settings.max_body_bytes),  # the HTTP body limit, here too
        ("grpc.so_reuseport", 1),  # several workers bind the same port (Linux shares connections among them)
    ]
    return grpc.aio.server(interceptors=interceptors, options=options), "python"


class GrpcFrontEnd:
    """The gRPC server, its health service and reflection, bound to the worker's event loop."""

    def __init__(self, clf: Classifier, settings: Settings, keys: ApiKeys):
        self.settings = settings
        # Only when keys are on: an interceptor is one more coroutine on every call (~30 µs of the loop here).
        interceptors = [_ApiKeyCheck(keys)] if keys.enabled else []
        self.server, self.transport = _server(settings, interceptors)
        add_servicer(InferenceServicer(clf), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self.server
        )
        address = f"{settings.host}:{settings.grpc_port}"
        tls = settings.grpc_tls_cert and settings.grpc_tls_key
        if tls and self.transport == "native":
            self.port = self.server.add_secure_port(address, (settings.grpc_tls_cert, settings.grpc_tls_key))
        elif tls:
            credentials = grpc.ssl_server_credentials([(settings.grpc_tls_key.read_bytes(), settings.grpc_tls_cert.read_bytes())])
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"cannot bind the gRPC port {address}")
        self.address = address

    async def start(self) -> None:
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC (KServe v2, health, reflection) on %s%s, %s transport", self.address,
                 " with TLS" if self.settings.grpc_tls_cert else "", self.transport)

    async def begin_drain(self) -> None:
        """Health turns NOT_SERVING for good; calls still arriving are refused by the draining classifier."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_s: float) -> None:
        await self.begin_drain()
        await self.server.stop(grace_s)
