"""MusicGen in plain PyTorch: loads the published checkpoint layout and reproduces transformers exactly.

Model math and per-sequence state only: no I/O beyond reading checkpoints, no networking.
"""

from .threads import apply_gomp_policy

apply_gomp_policy()  # before anything imports torch: libgomp reads its settings once, when torch loads it

from .config import CheckpointError, MusicGenConfig
from .generation import SequenceState, StepResult, step_sequences
from .model import GenerationOutput, MusicGen, TextConditioning
from .prompts import MAX_PROMPTS, WeightedPrompts
from .sampling import SamplingParams
from .tokenizer import PromptTooLongError

__all__ = ["CheckpointError", "GenerationOutput", "MAX_PROMPTS", "MusicGen", "MusicGenConfig", "PromptTooLongError",
           "SamplingParams", "SequenceState", "StepResult", "TextConditioning", "WeightedPrompts", "step_sequences"]
