"""Channel settings shared by the blocking and the asyncio client: address, TLS, bearer token, message sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the server's default (ModelInfo.max_message_bytes)


@dataclass(frozen=True)
class Connection:
    target: str
    credentials: grpc.ChannelCredentials | None  # None: plaintext
    metadata: tuple[tuple[str, str], ...]  # sent on every call
    options: tuple[tuple[str, object], ...]
    max_message_bytes: int  # what the server accepts per message: appended audio is split under it

    @classmethod
    def build(cls, target: str, *, secure: bool = False, root_certificates: bytes | str | Path | None = None,
              token: str | None = None, tls_server_name: str | None = None,
              max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
              options: tuple[tuple[str, object], ...] = ()) -> "Connection":
        credentials = None
        if secure or root_certificates is not None:
            roots = root_certificates
            if isinstance(roots, (str, Path)):
                roots = Path(roots).read_bytes()
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        channel_options = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                           ("grpc.max_send_message_length", max_message_bytes)]
        if tls_server_name:
            channel_options.append(("grpc.ssl_target_name_override", tls_server_name))
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return cls(target, credentials, metadata, tuple(channel_options) + tuple(options), max_message_bytes)

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.target, options=self.options)
        return grpc.secure_channel(self.target, self.credentials, options=self.options)

    def aio_channel(self) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.target, options=self.options)
        return grpc.aio.secure_channel(self.target, self.credentials, options=self.options)
