"""The model's modules, under the names the loader maps checkpoint keys to (loading.KEY_PREFIXES)."""

from __future__ import annotations

from torch import nn

from .config import MusicGenConfig
from .decoder import MusicgenDecoder
from .encodec import Encodec
from .t5 import T5Encoder


class MusicGenModules(nn.Module):
    """The weights, under names the loader maps checkpoint keys to."""

    def __init__(self, config: MusicGenConfig):
        super().__init__()
        self.text_encoder = T5Encoder(config.text_encoder)
        self.decoder = MusicgenDecoder(config.decoder)
        self.audio_encoder = Encodec(config.audio_encoder)
        if config.has_enc_to_dec_proj:
            self.enc_to_dec_proj = nn.Linear(config.text_encoder.d_model, config.decoder.hidden_size)
