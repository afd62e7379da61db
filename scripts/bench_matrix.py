"""Which training runs ``bench_gpu.py`` makes: one :class:`Variant` per run, in pairs.

A run is named by its settings, ``ours-b16-cached-fp16-sdpa-gc``, and
:func:`parse_variant` reads such a name back, so a caller can ask for exactly the runs it
wants (``bench_gpu.py --variants``) instead of a product of lists.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

TRAINERS = ("ours", "diffusers")
LATENTS = ("cached", "uncached")
PRECISIONS = ("no", "fp16", "bf16")
ATTENTION = ("sdpa", "xformers")
FLAGS = {"gc": "checkpointing", "compile": "compile", "cl": "channels_last"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One training run of the matrix."""

    trainer: str  # "ours" or "diffusers"
    batch: int
    latents: str  # "cached" or "uncached" (the diffusers script always encodes)
    precision: str  # "no", "fp16" or "bf16"
    attention: str  # "sdpa" or "xformers"
    checkpointing: bool
    compile: bool = False
    channels_last: bool = False

    def name(self) -> str:
        flags = [f"b{self.batch}", self.latents, self.precision, self.attention]
        flags += ["gc"] * self.checkpointing + ["compile"] * self.compile
        flags += ["cl"] * self.channels_last
        return "-".join([self.trainer, *flags])


def parse_variant(name: str) -> Variant:
    """The :class:`Variant` that :meth:`Variant.name` wrote as ``name``.

    Raises:
        ValueError: naming the part that is not a trainer, batch, latents, precision,
            attention or flag, or a diffusers run asked for what the script cannot do.
    """
    parts = name.split("-")
    if len(parts) < 5:
        raise ValueError(
            f"variant {name!r}: expected TRAINER-bBATCH-LATENTS-PRECISION-ATTENTION[-FLAG...], "
            "e.g. ours-b16-cached-fp16-sdpa-gc"
        )
    trainer, batch, latents, precision, attention, *flags = parts
    choices = [
        ("trainer", trainer, TRAINERS),
        ("latents", latents, LATENTS),
        ("precision", precision, PRECISIONS),
        ("attention", attention, ATTENTION),
    ]
    for what, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"variant {name!r}: {what} {value!r} is not one of {allowed}")
    if not (batch.startswith("b") and batch[1:].isdigit() and int(batch[1:]) > 0):
        raise ValueError(f"variant {name!r}: batch {batch!r} is not b<positive number>")
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise ValueError(f"variant {name!r}: unknown flag(s) {unknown}; flags are {list(FLAGS)}")
    on = {field: flag in flags for flag, field in FLAGS.items()}
    variant = Variant(trainer, int(batch[1:]), latents, precision, attention, **on)
    if trainer == "diffusers" and (latents == "cached" or variant.compile or variant.channels_last):
        raise ValueError(
            f"variant {name!r}: the diffusers script has no latent cache, compile or "
            "channels_last; its runs are uncached, with gc at most"
        )
    return variant


def matrix(args: argparse.Namespace) -> list[Variant]:
    """The runs asked for: ``--variants`` as named, else every combination of the lists.

    Runs come in pairs: for each batch, precision, attention and checkpointing, our runs
    (latents, compile, channels_last), then the diffusers script's run at the same settings
    (uncached, no compile or channels_last: the script offers none of them). A sitting cut
    short by ``--budget-s`` has then measured whole comparisons, not ours without the peer.
    """
    if args.variants:
        return [parse_variant(name) for name in args.variants]
    on = {"on": True, "off": False}
    runs = []
    for b, p, att, gc in itertools.product(
        args.batch_sizes, args.precisions, args.attention, args.checkpointing
    ):
        runs += [
            Variant("ours", b, lat, p, att, on[gc], on[comp], on[cl])
            for lat, comp, cl in itertools.product(args.latents, args.compile, args.channels_last)
        ]
        if args.diffusers_script:
            runs.append(Variant("diffusers", b, "uncached", p, att, on[gc]))
    return runs
