"""Sound devices through sounddevice (PortAudio), imported only when playback or capture is actually used, so
the rest of the client works on machines without PortAudio."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

INSTALL_HINT = ("install PortAudio and sounddevice (Debian/Ubuntu: `apt-get install libportaudio2`, then "
                "`pip install sounddevice` or `pip install 'musicgen-live[client]'`; macOS: `brew install portaudio`), "
                "or run without audio output: --no-playback --out FILE.wav")


class AudioUnavailable(RuntimeError):
    """Playback or capture is impossible here: sounddevice or the PortAudio library is missing, or there is
    no usable device. The message says what to install or which option to use instead."""


def sounddevice() -> ModuleType:
    """The sounddevice module, or AudioUnavailable saying precisely what is missing."""
    try:
        import sounddevice as sd
    except ModuleNotFoundError:
        raise AudioUnavailable(f"the Python package sounddevice is not installed: {INSTALL_HINT}") from None
    except OSError as error:  # sounddevice raises OSError('PortAudio library not found')
        raise AudioUnavailable(f"{error}: {INSTALL_HINT}") from None
    return sd


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    channels: int  # the most it accepts in the direction asked for
    default_sample_rate: float
    low_latency: float
    high_latency: float


def find_device(spec: int | str | None = None, kind: str = "output") -> Device:
    """A device by index, by (case-insensitive) name substring, or the default (None) for `kind` "output" or
    "input". Raises AudioUnavailable listing the devices when nothing matches."""
    sd = sounddevice()
    key = "max_output_channels" if kind == "output" else "max_input_channels"
    devices = [dict(info, index=i) for i, info in enumerate(sd.query_devices())]
    usable = [d for d in devices if d[key] > 0]
    if isinstance(spec, str) and spec.strip().lstrip("-").isdigit():
        spec = int(spec)
    if spec is None:
        try:
            info = sd.query_devices(kind=kind)
        except Exception as error:  # PortAudioError: no default device
            raise AudioUnavailable(f"no default {kind} device ({error}); devices: {_names(usable)}. Use "
                                   f"--no-playback --out FILE.wav on machines without audio") from None
        match = [d for d in usable if d["name"] == info["name"]] or [dict(info, index=info.get("index", -1))]
    elif isinstance(spec, int):
        match = [d for d in usable if d["index"] == spec]
    else:
        match = [d for d in usable if spec.lower() in d["name"].lower()]
    if not match:
        raise AudioUnavailable(f"no {kind} device matches {spec!r}; {kind} devices: {_names(usable)}")
    info = match[0]
    return Device(info["index"], info["name"], info[key], info["default_samplerate"],
                  info[f"default_low_{kind}_latency"], info[f"default_high_{kind}_latency"])


def _names(devices: list[dict]) -> str:
    return ", ".join(f"{d['index']}: {d['name']}" for d in devices) or "none"


def supports(device: Device, sample_rate: int, channels: int, kind: str = "output") -> bool:
    sd = sounddevice()
    check = sd.check_output_settings if kind == "output" else sd.check_input_settings
    try:
        check(device=device.index, samplerate=sample_rate, channels=channels, dtype="float32")
    except Exception:
        return False
    return True


def preferred_stream_rate(device: int | str | None, model_rate: int, supported_rates: tuple[int, ...]) -> int:
    """The output rate to ask the server for: the model's own if the device runs at it, else the device's
    default rate when the server offers it (44.1 / 48 kHz), else the model's (the Player then resamples)."""
    found = find_device(device)
    if supports(found, model_rate, min(found.channels, 2)):
        return model_rate
    default = int(found.default_sample_rate)
    return default if default in supported_rates else model_rate
