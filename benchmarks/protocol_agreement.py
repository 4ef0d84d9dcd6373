"""Every image of a labelled folder through all three protocols of a running vitserve: do they answer the same?

    vitserve bench protocols --url http://127.0.0.1:3000 --grpc 127.0.0.1:8001 --images data/fashion-mnist/test

Our JSON API (multipart POST /classify), KServe v2 over HTTP (binary tensor extension, classification=1) and KServe
v2 over gRPC (ModelInfer, raw BYTES input, classification=1), each with the same encoded files in the same groups.
Reports the top-1 agreement of each pair of protocols over every image and each protocol's accuracy against the
folder's labels (class subfolders). Results: benchmarks/results/protocol-agreement_<model>_<env>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
from pathlib import Path

import httpx

from benchmarks.harness.results import command_line, environment, finish

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def labelled_files(root: Path) -> list[tuple[Path, str]]:
    return sorted((p, p.parent.name) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


async def via_classify(url: str, groups: list[list[bytes]], concurrency: int) -> list[int]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120, trust_env=False) as c:
        async def one(group):
            async with sem:
                r = await c.post(f"{url}/classify", files=[("images", (f"{i}", b)) for i, b in enumerate(group)], params={"top_k": 1})
                r.raise_for_status()
                return [p["top1"]["index"] for p in r.json()["predictions"]]

        return [i for g in await asyncio.gather(*(one(g) for g in groups)) for i in g]


async def via_v2_http(url: str, model: str, groups: list[list[bytes]], concurrency: int) -> list[int]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120, trust_env=False) as c:
        async def one(group):
            data = b"".join(struct.pack("<I", len(b)) + b for b in group)
            head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(group)], "parameters": {"binary_data_size": len(data)}}],
                               "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}).encode()
            async with sem:
                r = await c.post(f"{url}/v2/models/{model}/infer", content=head + data,
                                 headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"})
                r.raise_for_status()
            return [int(s.split(":")[1]) for s in r.json()["outputs"][0]["data"]]

        return [i for g in await asyncio.gather(*(one(g) for g in groups)) for i in g]


async def via_grpc(target: str, model: str, groups: list[list[bytes]], concurrency: int) -> list[int]:
    import grpc

    from service.protos import grpc_service_pb2 as pb
    from service.protos import grpc_service_pb2_grpc as pb_grpc
    from service.kserve_v2 import split_bytes

    sem = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def one(group):
            req = pb.ModelInferRequest(model_name=model)
            req.inputs.add(name="image", datatype="BYTES", shape=[len(group)])
            req.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in group))
            req.outputs.add(name="probabilities").parameters["classification"].int64_param = 1
            async with sem:
                r = await stub.ModelInfer(req, timeout=120)
            return [int(s.split(b":")[1]) for s in split_bytes(r.raw_output_contents[0], "output")]

        return [i for g in await asyncio.gather(*(one(g) for g in groups)) for i in g]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="vitserve bench protocols", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:3000", help="the service's HTTP base URL")
    p.add_argument("--grpc", default="127.0.0.1:8001", help="its gRPC address")
    p.add_argument("--images", type=Path, required=True, help="a folder of class subfolders")
    p.add_argument("--per-request", type=int, default=8, help="images per request (every protocol the same)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per protocol")
    p.add_argument("--name", default=None, help="result file prefix (default: protocol-agreement_<model>)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    info = httpx.get(f"{args.url}/info", timeout=10, trust_env=False).json()
    model, labels = info["model"]["name"], info["labels"]
    files = labelled_files(args.images)
    data = [f.read_bytes() for f, _ in files]
    groups = [data[i : i + args.per_request] for i in range(0, len(data), args.per_request)]
    answers = {
        "http": asyncio.run(via_classify(args.url, groups, args.concurrency)),
        "v2-http": asyncio.run(via_v2_http(args.url, model, groups, args.concurrency)),
        "grpc": asyncio.run(via_grpc(args.grpc, model, groups, args.concurrency)),
    }
    truth = [labels.index(label) if label in labels else -1 for _, label in files]
    n = len(files)
    pairs = {f"{a} = {b}": sum(x == y for x, y in zip(answers[a], answers[b])) / n
             for a, b in (("http", "v2-http"), ("http", "grpc"), ("v2-http", "grpc"))}
    accuracy = {k: sum(x == t for x, t in zip(v, truth)) / n for k, v in answers.items()}
    table = ("| | images | top-1 agreement |\n|---|---|---|\n" + "\n".join(f"| {k} | {n} | {v:.6f} |" for k, v in pairs.items())
             + "\n\n| protocol | top-1 accuracy against the folder labels |\n|---|---|\n"
             + "\n".join(f"| {k} | {v:.4f} |" for k, v in accuracy.items()))
    payload = {"benchmark": "protocol_agreement", "command": command_line("protocols", argv),
               "environment": environment(), "model": model, "engine": info["engine"]["engine"], "images": n,
               "per_request": args.per_request, "agreement": pairs, "accuracy": accuracy}
    print(table)
    rows = [(k, f"{v:.6f} over {n} images") for k, v in pairs.items()] + [(f"accuracy {k}", f"{v:.4f}") for k, v in accuracy.items()]
    return finish("protocol agreement", payload, rows, table=table, name=None if args.no_write else args.name or f"protocol-agreement_{model}")


if __name__ == "__main__":
    sys.exit(main())
