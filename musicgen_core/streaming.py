"""The streaming pieces of a live session, in one import: the frame resolver (delayed LM columns -> whole
frames), the streaming EnCodec decoder and encoder with explicit state, and the latency they add.

Pure model math and state: no I/O, no threads. See resolver.py and streaming_codec.py.
"""

from .resolver import FrameResolver, ResolvedFrame
from .streaming_codec import (
    DecoderState,
    EncoderState,
    StreamLatency,
    algorithmic_latency,
    decode_step,
    decoder_lookahead_samples,
    encode_flush,
    encode_step,
    encoder_final_frames,
    encoder_lookahead_samples,
    final_output_count,
    flush,
    init_decoder_state,
    init_encoder_state,
    init_layer_states,
    split_channels,
    stream_layers_flush,
    stream_layers_step,
)

__all__ = ["DecoderState", "EncoderState", "FrameResolver", "ResolvedFrame", "StreamLatency", "algorithmic_latency",
           "decode_step", "decoder_lookahead_samples", "encode_flush", "encode_step", "encoder_final_frames",
           "encoder_lookahead_samples", "final_output_count", "flush", "init_decoder_state", "init_encoder_state",
           "init_layer_states", "split_channels", "stream_layers_flush", "stream_layers_step"]
