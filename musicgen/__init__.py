"""The MusicGen gRPC protocol, by version: ``musicgen.v1`` holds the stubs generated from
``protos/musicgen/v1/musicgen.proto`` (see ``protos/README.md``)."""
