"""`musicgen-server`: load a model, start the engine, serve gRPC (with health and reflection) until a signal."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import musicgen_core  # noqa: F401  first: it sets libgomp's policy before torch loads libgomp (threads.py)
import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from musicgen_core import CheckpointError, MusicGen
from musicgen_core.quantize import QUANTIZATIONS
from musicgen_core.threads import set_threads, thread_policy

from .engine import Engine, EngineConfig, call_in_fresh_thread
from .service import SERVICE_NAME, MusicGenService, add_to_server

log = logging.getLogger("musicgen.server")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_DTYPES = {**DTYPES, "int8": torch.int8}  # int8: with --quantize int8 / int4 (our kernel's decoder)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Every call must carry `authorization: Bearer <token>`; others get UNAUTHENTICATED."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}"

    async def intercept_service(self, continuation, details):
        metadata = dict(details.invocation_metadata or ())
        if metadata.get("authorization") == self.expected:
            return await continuation(details)
        return _unauthenticated(await continuation(details))


def _unauthenticated(handler):
    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")
        yield  # pragma: no cover  (makes this an async generator)

    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny_unary, handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny_unary, handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(deny_stream, handler.request_deserializer,
                                                 handler.response_serializer)


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    max_message_bytes: int = 4 * 1024 * 1024
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    engine: Engine
    health: health_aio.HealthServicer

    async def stop(self, grace: float = 5.0, drain: float = 0.0) -> None:
        """Graceful: health says NOT_SERVING; with `drain`, sessions get Notice(SERVER_DRAINING) and up to that
        many seconds for their clients to resume elsewhere; the rest get Finished(SERVER_SHUTDOWN); then the
        server stops."""
        await self.health.enter_graceful_shutdown()
        if drain > 0:
            await asyncio.to_thread(self.engine.drain, drain)
        await asyncio.to_thread(self.engine.shutdown, grace)
        await self.server.stop(grace)


async def start_server(engine: Engine, options: ServerOptions, warm_up: bool = False) -> RunningServer:
    """Bind, start the engine (and with warm_up, run one short session through it before accepting calls),
    then serve and report SERVING on the health service."""
    interceptors = [BearerTokenInterceptor(options.token)] if options.token else []
    limits = [("grpc.max_receive_message_length", options.max_message_bytes),
              ("grpc.max_send_message_length", options.max_message_bytes)]
    server = grpc.aio.server(interceptors=interceptors, options=limits)
    add_to_server(MusicGenService(engine, options.max_message_bytes), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME], server)
    address = f"{options.host}:{options.port}"
    if options.tls_cert or options.tls_key:
        if not (options.tls_cert and options.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        credentials = grpc.ssl_server_credentials([(options.tls_key.read_bytes(), options.tls_cert.read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    engine.start()
    policy = " ".join(f"{key}={str(value).replace(' ', '-')}" for key, value in thread_policy().items())
    log.info("event=threads %s", policy)
    if warm_up:
        seconds = await asyncio.to_thread(engine.warm_up)
        log.info("event=warmed_up seconds=%.2f", seconds)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, engine, health)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicgen-server", description=__doc__)
    parser.add_argument("--model", default="demo", help="checkpoint directory, hub id in the local HF cache, or demo")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--quantize", choices=list(QUANTIZATIONS),
                        help="quantized decoder weights (CPU): int8 = our kernel (AVX-512 VNNI or AVX2), else fbgemm;"
                             " int4 (= int4-g64) / int4-g32 / int4-g128: our int4 kernel (AVX2), a scale per 32-128"
                             " inputs")
    parser.add_argument("--kv-dtype", choices=sorted(KV_DTYPES),
                        help="self-attention cache dtype (default: the weights' dtype; with --quantize int8/int4, int8:"
                             " a scale per head vector, half of bf16's bytes; with int8-fbgemm, bfloat16 on a bf16 CPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--max-sessions", type=int, default=8)
    parser.add_argument("--context-frames", type=int, help="context window in frames before a re-prime (default 30 s)")
    parser.add_argument("--reprime-keep-frames", "--reprime-frames", dest="reprime_keep_frames", type=int,
                        help="frames kept at a re-prime (default 40%% of the context window)")
    parser.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--stall-timeout", type=float, default=EngineConfig.stall_timeout_seconds,
                        help="end a session that waits at its lead this many seconds with no ack (paced) or no "
                             "read (unpaced)")
    parser.add_argument("--token", help="require `authorization: Bearer TOKEN` on every call")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--drain-seconds", type=float, default=10.0,
                        help="on SIGTERM, how long sessions get to resume on another replica (Notice "
                             "SERVER_DRAINING) before they are finished (default 10; 0 = finish at once)")
    parser.add_argument("--log-level", default="INFO")
    return parser


async def serve(args: argparse.Namespace) -> None:
    if not args.stall_timeout > 0:
        raise ValueError(f"--stall-timeout must be > 0, got {args.stall_timeout}")
    # Loaded on a thread that ends (see call_in_fresh_thread): only the engine's thread keeps an OpenMP pool.
    model = await asyncio.to_thread(call_in_fresh_thread, MusicGen.from_pretrained, args.model, args.device,
                                    DTYPES[args.dtype], args.quantize,
                                    kv_dtype=KV_DTYPES[args.kv_dtype] if args.kv_dtype else None)
    if args.model == "demo":
        log.warning("event=demo_model note='random weights: the output is noise'")
    engine = Engine(model, EngineConfig(max_sessions=args.max_sessions, context_frames=args.context_frames,
                                        reprime_keep_frames=args.reprime_keep_frames,
                                        stall_timeout_seconds=args.stall_timeout))
    options = ServerOptions(host=args.host, port=args.port, max_message_bytes=args.max_message_bytes,
                            token=args.token, tls_cert=args.tls_cert, tls_key=args.tls_key)
    running = await start_server(engine, options, warm_up=True)
    log.info("event=listening address=%s:%d model=%s sample_rate=%d max_sessions=%d tls=%s auth=%s",
             args.host, running.port, model.config.name, model.config.sampling_rate, args.max_sessions,
             bool(args.tls_cert), bool(args.token))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("event=shutting_down active_sessions=%d", engine.active_sessions)
    await running.stop(drain=args.drain_seconds)
    log.info("event=stopped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    try:
        if args.threads:
            set_threads(args.threads)
        asyncio.run(serve(args))
    except (CheckpointError, ValueError, OSError) as error:
        print(f"musicgen-server: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
