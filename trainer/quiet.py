"""Library notices a user can do nothing about, dropped at their source, in one place.

Each is dropped by its exact text, on the logger that emits it, so every other message of
those libraries still comes through.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class DropMessages(logging.Filter):
    """Drops log records whose message contains one of the given texts."""

    def __init__(self, *texts: str) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.texts)


# transformers 5 logs this once per process when diffusers' pipeline module imports
# CLIPImageProcessor without torchvision. We pass no feature extractor, and torchvision cannot
# be installed beside the CPU torch wheel.
TORCHVISION_FALLBACK = DropMessages("requires torchvision (not installed); falling back to")

# diffusers warns, for each text encoder, that a LoRA has no keys for it: the normal case of a
# UNet-only LoRA. Dropped only around loading a file that holds no text-encoder tensors.
NO_TEXT_KEYS = DropMessages("No LoRA keys associated to")
DIFFUSERS_LORA_LOGGERS = ("diffusers.loaders.lora_base", "diffusers.loaders.peft")
# diffusers logs a LoRA that does not fit the model (a page of size mismatches) before it
# re-raises; dropped where the caller turns that error into one line of its own.
LORA_LOAD_FAILED = DropMessages("was unsuccessful with the following error")


def import_notices() -> None:
    """Drop the notices that importing diffusers, peft and transformers prints; call before
    those imports.

    peft imports bitsandbytes when it is installed (the adamw8bit extra); on a CPU with
    AVX512-BF16 that warns that an optional 4-bit CPU kernel package is missing. We never run
    4-bit CPU matmuls.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logger = logging.getLogger("transformers.utils.import_utils")
    if TORCHVISION_FALLBACK not in logger.filters:
        logger.addFilter(TORCHVISION_FALLBACK)


@contextmanager
def dropping(drop: DropMessages, logger_names: Sequence[str]) -> Iterator[None]:
    """Drop ``drop``'s messages on these loggers inside the block only."""
    loggers = [logging.getLogger(name) for name in logger_names]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
