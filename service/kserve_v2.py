"""The KServe v2 / Open Inference Protocol without a transport: tensors in, tensors out, on the same Classifier.

Both v2 front-ends parse their wire format into :class:`Tensor` inputs and :class:`RequestedOutput` s, call
:func:`infer`, and render the :class:`Tensor` outputs back: ``v2_http_api.py`` (JSON, plus Triton's binary tensor
extension) and ``grpc_api.py`` (``inference.GRPCInferenceService``). What this model takes and returns:

    inputs (exactly one per request)
      image          BYTES [N] (or [N, 1])   each element one encoded image file (JPEG, PNG, ...)
      pixel_values   FP32  [N, 3, H, W]      already preprocessed exactly as the manifest says
    outputs
      probabilities  FP32  [N, L]            softmax(logits / T), T = the manifest's calibrated temperature
                     with parameter classification=k: BYTES [N, k] "score:index:label" (Triton's classification
                     extension), best first

Errors are ``ServiceError`` s from ``service.errors``: each transport maps them with the one table.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field

import numpy as np

from service.admission import Ticket
from service.classifier import Classification, Classifier
from service.errors import EmptyRequest, InvalidParameter, NotFound

IMAGE_INPUT = "image"
PIXELS_INPUT = "pixel_values"
PROBABILITIES_OUTPUT = "probabilities"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration")
PLATFORM = "vitserve"


@dataclass
class Tensor:
    """One input or output tensor. ``data`` is a list of bytes for BYTES, a float32 array otherwise."""

    name: str
    datatype: str
    shape: list[int]
    data: list[bytes] | np.ndarray
    parameters: dict = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    classification: int | None = None  # Triton's classification extension: the top k as "score:index:label"
    binary: bool | None = None  # HTTP binary tensor extension; None = the request's default


# ---- BYTES tensors on the wire ---------------------------------------------------------------------------------------
def split_bytes(raw: bytes, what: str) -> list[bytes]:
    """A serialised BYTES tensor (each element a 4-byte little-endian length, then that many bytes) → its elements."""
    items, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidParameter(f"{what}: truncated BYTES tensor (a 4-byte length prefix is cut off at byte {i})")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise InvalidParameter(f"{what}: BYTES element {len(items)} claims {n} bytes, only {len(raw) - i - 4} follow")
        items.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return items


def join_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def tensor_from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> Tensor:
    """Binary wire data (gRPC raw_input_contents, HTTP binary extension) → a Tensor, after the name/dtype check."""
    check_input(name, datatype)
    if datatype == "BYTES":
        return Tensor(name, datatype, shape, split_bytes(raw, f"input '{name}'"))
    if len(raw) % 4:
        raise InvalidParameter(f"input '{name}': {len(raw)} bytes of FP32 data is not a whole number of floats")
    return Tensor(name, datatype, shape, np.frombuffer(raw, dtype="<f4").astype(np.float32))


def tensor_from_values(name: str, datatype: str, shape: list[int], values) -> Tensor:
    """Typed values (gRPC contents, HTTP JSON "data") → a Tensor. JSON BYTES elements are base64 strings."""
    check_input(name, datatype)
    if datatype == "BYTES":
        items = []
        for i, v in enumerate(values):
            if isinstance(v, bytes):
                items.append(v)
                continue
            try:
                items.append(base64.b64decode(v, validate=True))
            except (binascii.Error, TypeError, ValueError):
                raise InvalidParameter(f"input '{name}' element {i}: BYTES data in JSON must be base64-encoded") from None
        return Tensor(name, datatype, shape, items)
    try:
        return Tensor(name, datatype, shape, np.asarray(values, dtype=np.float32).reshape(-1))
    except (TypeError, ValueError):
        raise InvalidParameter(f"input '{name}': FP32 data must be numbers") from None


def check_input(name: str, datatype: str) -> None:
    known = {IMAGE_INPUT: "BYTES", PIXELS_INPUT: "FP32"}
    if name not in known:
        raise InvalidParameter(
            f"unknown input '{name}'; this model takes '{IMAGE_INPUT}' (BYTES [N], encoded images) or "
            f"'{PIXELS_INPUT}' (FP32 [N, 3, H, W], preprocessed)"
        )
    if datatype != known[name]:
        raise InvalidParameter(f"input '{name}' must be {known[name]}, got {datatype or 'no datatype'}")


# ---- what the model is --------------------------------------------------------------------------------------------------
class Model:
    """The served model as the protocol describes it (names, versions, tensor metadata, configuration)."""

    def __init__(self, clf: Classifier):
        self.clf = clf
        m = clf.manifest
        self.name, self.version = m.model.name, m.model.version
        h, w = clf.input_size
        self.labels = m.labels
        self.inputs = [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1, 1]},  # as the config says: [batch] + dims [1]
            {"name": PIXELS_INPUT, "datatype": "FP32", "shape": [-1, 3, h, w]},
        ]
        self.outputs = [{"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, len(m.labels)]}]
        self.parameters = {  # what the metadata says beyond names and shapes
            "labels": json.dumps(m.labels),
            "preprocessing": m.preprocessing.model_dump_json(),
            "probabilities": f"softmax(logits / T) with the calibrated temperature T = {m.temperature:g}",
            "classification": "request parameter classification=k on 'probabilities': BYTES [N, k] 'score:index:label'",
            "engine": clf.engine.name,
        }

    def check(self, name: str, version: str) -> None:
        if name != self.name or version not in ("", self.version):
            raise NotFound(
                f"model '{name}'{f' version {version}' if version else ''} is not served here; "
                f"this server serves '{self.name}' version {self.version}"
            )

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [self.version], "platform": PLATFORM, "inputs": self.inputs, "outputs": self.outputs}

    def config(self) -> dict:
        """Triton's model configuration (its JSON form), which perf_analyzer and tritonclient's get_model_config read.
        max_batch_size > 0 means dims exclude the batch dimension; "image" is one element per batch entry. Both inputs
        are ``optional``: a request carries exactly one of them, and generic clients (perf_analyzer) demand data for
        every input that is not marked optional ("missing tensor pixel_values")."""
        h, w = self.clf.input_size
        return {
            "name": self.name,
            "platform": PLATFORM,
            "max_batch_size": self.clf.settings.max_images_per_request,
            "input": [
                {"name": IMAGE_INPUT, "data_type": "TYPE_STRING", "dims": ["1"], "reshape": {"shape": []}, "optional": True},
                {"name": PIXELS_INPUT, "data_type": "TYPE_FP32", "dims": ["3", str(h), str(w)], "optional": True},
            ],
            "output": [{"name": PROBABILITIES_OUTPUT, "data_type": "TYPE_FP32", "dims": [str(len(self.labels))]}],
            "parameters": {k: {"string_value": v} for k, v in self.parameters.items()},
        }


# ---- inference ------------------------------------------------------------------------------------------------------------
def _count(t: Tensor, input_size: tuple[int, int]) -> int:
    """Images in the tensor, after checking its shape against its data."""
    if t.name == IMAGE_INPUT:
        n = len(t.data)
        if t.shape not in ([n], [n, 1]):
            raise InvalidParameter(f"input '{IMAGE_INPUT}' has shape {t.shape} but {n} elements; use [{n}] (or [{n}, 1])")
        return n
    h, w = input_size
    if len(t.shape) != 4 or list(t.shape[1:]) != [3, h, w] or t.shape[0] < 0:
        raise InvalidParameter(f"input '{PIXELS_INPUT}' must have shape [N, 3, {h}, {w}], got {t.shape}")
    if t.data.size != int(np.prod(t.shape)):
        raise InvalidParameter(f"input '{PIXELS_INPUT}' has shape {t.shape} ({int(np.prod(t.shape))} values) but {t.data.size} values")
    return t.shape[0]


def validate(inputs: list[Tensor], outputs: list[RequestedOutput], labels: int,
             input_size: tuple[int, int]) -> tuple[Tensor, int, int]:
    """A parsed v2 request, checked before any image is read: its one input tensor, its image count, and the top-k
    its outputs ask for. Raises the error table's exceptions (fuzzed by ``vitserve bench fuzz``)."""
    if not inputs:
        raise EmptyRequest("no input tensor in the request")
    if len(inputs) > 1:
        raise InvalidParameter(f"one input per request, got {len(inputs)}: {[t.name for t in inputs]}")
    for o in outputs:
        if o.name != PROBABILITIES_OUTPUT:
            raise InvalidParameter(f"unknown output '{o.name}'; this model returns '{PROBABILITIES_OUTPUT}'")
        if o.classification is not None and not 1 <= o.classification <= labels:
            raise InvalidParameter(f"classification must be between 1 and {labels} (the labels), got {o.classification}")
    (t,) = inputs
    n = _count(t, input_size)
    if n == 0:
        raise EmptyRequest(f"input '{t.name}' has no elements")
    k = max((o.classification or 1 for o in outputs), default=1)  # the classifier checks 1 <= k <= labels
    return t, n, k


async def infer(model: Model, inputs: list[Tensor], outputs: list[RequestedOutput], protocol: str,
                ticket: Ticket | None = None) -> tuple[list[Tensor], Classification]:
    """Validate a v2 request, classify through the shared Classifier (so every protocol shares its batches, limits,
    admission and metrics), and build the requested output tensors. ``ticket``: the request's admission."""
    t, n, k = validate(inputs, outputs, len(model.labels), model.clf.input_size)
    if t.name == IMAGE_INPUT:
        result = await model.clf.classify(t.data, top_k=k, protocol=protocol, ticket=ticket)
    else:
        result = await model.clf.classify_pixels(t.data.reshape(t.shape), top_k=k, protocol=protocol, ticket=ticket)
    rendered = []
    for o in outputs or [RequestedOutput(PROBABILITIES_OUTPUT)]:
        if o.classification:
            # The classifier ranked k = the most any output asks for, as for our JSON API's top-k (on the float64
            # probabilities): each output takes its first ones instead of ranking the float32 copy again.
            strings = [f"{p.score:f}:{p.index}:{p.label}".encode() for top in result.top for p in top[: o.classification]]
            rendered.append(Tensor(o.name, "BYTES", [n, o.classification], strings))
        else:
            rendered.append(Tensor(o.name, "FP32", [n, len(model.labels)], result.probabilities))
    return rendered, result


def response_parameters(result: Classification) -> dict[str, str]:
    """Stage timings and which engine batch served each image, as response parameters (strings on every transport)."""
    out = {f"vitserve_{k}_ms": f"{v:.2f}" for k, v in result.timings_ms.items()}
    out["vitserve_batch_size"] = str(result.batch_size)
    out["vitserve_batch_ids"] = ",".join(map(str, result.batch_ids))
    return out


def raw(t: Tensor) -> bytes:
    """A tensor's binary wire form: BYTES length-prefixed, FP32 little-endian row-major."""
    return join_bytes(t.data) if t.datatype == "BYTES" else np.ascontiguousarray(t.data, dtype="<f4").tobytes()
