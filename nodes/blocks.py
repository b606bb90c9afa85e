"""Per-block LoRA weights: a row's ``blocks`` text -> one weight (a dimensionless multiplier) per weight key.

The syntax is that of Inspire Pack's LoRA Block Weight node (ltdrdata/ComfyUI-Inspire-Pack,
``inspire/lora_block_weight.py`` at 25ae8d52 and ``resources/lbw-preset.txt`` at 30974e69; read, not copied): a
preset name or comma-separated numbers, optionally ``LABEL:`` before either. The first value is BASE. A term
(one LoRA module on one weight key) is applied at ``strength_model * weight`` on the diffusion model, where the
weight is its block's value or BASE for keys outside the blocks, and at ``strength_clip * BASE`` on the text
encoder; a weight 0 leaves the term out.

Followed from Inspire:

- numeric vectors, numbers as Inspire's ``is_numeric_string`` reads them (``-?digits[.digits]``), spaces around
  each value ignored; ``LABEL:`` before the vector or preset (the label is only kept in the row's text);
- the numeric presets of lbw-preset.txt (``PRESETS``): SD-* (17 values) and SD-LyC-* (27) for SD1.x/SD2.x,
  SDXL-* (12) and SDXL-LyC-* (21) for SDXL;
- BASE applies to every key outside the input/middle/output (or double/single) blocks, the text-encoder keys
  included (``load_lbw``' "others"; the CLIP gets ``strength_clip * BASE``); weight 0 = not applied (Inspire's
  ``muted_weights``).

Different from Inspire:

- Inspire gives the vector's positions to the *distinct block numbers the LoRA touches*, in order, and keeps the
  last value for blocks past the vector's end (data-dependent: a LoCon that also touches ``input_blocks.3``
  shifts every later position). Here positions are FIXED block ids per length (``UNET_FORMS``), equal to
  Inspire's assignment for a LoRA that touches exactly the standard blocks (SD1 17: the attention blocks of a
  plain LoRA; 27: every block of a LyCORIS/LoCon file but ``input_blocks.0``; SDXL 12 / 21 likewise). A key in a
  block its form does not list (``input_blocks.3`` under a 17-value vector, ``input_blocks.0`` under any) gets
  BASE. The vector must have exactly one of the accepted lengths (Inspire accepts any length >= 12).
- Block weights are bounded, ``|w| <= MAX_WEIGHT`` (Inspire sets no bound).
- Not supported, refused with an error naming the row and what to write instead: ``R``/``U`` (random values),
  ``A``/``B`` (and ``a``/``b``: the node's A/B inputs), space-separated sub-vectors in one position, the ``%``
  spec syntax, and the presets built on them (SD-ROUT, SD-AOUT, SD-AB); the FLUX-DBL-* presets (18 values that
  only mean something under Inspire's data-dependent assignment); ``@`` XY-plot entries. Inspire's ``inverse``
  (1 - weight) is a node input, not part of the text: write the inverted values.

DiT models (no Inspire counterpart except Flux's data-dependent presets): the blocks are the model's stacks of
transformer blocks, ``DIT_LAYOUTS`` per model_config class, counted from the model's own weight keys. Two forms:
per block (BASE, then one value per block in order, the first stack's blocks before the second's: 1 + the block
count values) and per group (Flux-like: BASE, DOUBLE, SINGLE; one stack: BASE, BLOCKS). When both have the same
length (a model with that few blocks), the per-block form is meant. Presets ``FLUX-DOUBLE``/``FLUX-SINGLE`` are
group vectors for every double/single architecture.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..core import shown

__all__ = ["Blocks", "parse", "ModelBlocks", "supported_archs", "PRESETS", "UNET_FORMS", "DIT_LAYOUTS", "MAX_WEIGHT"]

MAX_WEIGHT = 10.0
"""Block weights beyond +-MAX_WEIGHT are refused as input mistakes (Inspire's A/B inputs range over +-10)."""


def _numbered(stem: str, first: int, last: int) -> tuple[str, ...]:
    """Block ids ``stem`` + two digits, ``first`` to ``last`` inclusive (``OUT03``, ..., ``OUT11``)."""
    return tuple(f"{stem}{i:02d}" for i in range(first, last + 1))


UNET_FORMS = {  # model family -> {length: block ids, BASE first}
    "SD1": {17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *_numbered("OUT", 3, 11)),
            27: ("BASE", *_numbered("IN", 1, 11), *_numbered("M", 0, 2), *_numbered("OUT", 0, 11))},
    "SDXL": {12: ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *_numbered("OUT", 0, 5)),
             21: ("BASE", *_numbered("IN", 1, 8), *_numbered("M", 0, 2), *_numbered("OUT", 0, 8))},
}
"""Block ids of the fixed UNet forms. ``INnn`` = weight keys ``diffusion_model.input_blocks.nn.*``, ``Mnn`` =
``middle_block.nn.*``, ``MID`` = all of ``middle_block``, ``OUTnn`` = ``output_blocks.nn.*``. SD1 17 / SDXL 12
are Inspire's positions for a plain LoRA (attention blocks only: SD1 input blocks 1, 2, 4, 5, 7, 8, middle block 1,
output blocks 3-11; SDXL input 4, 5, 7, 8, middle 1, output 0-5), 27 / 21 those for a LoRA on every block but
``input_blocks.0`` (SD1: 11 input, 3 middle, 12 output; SDXL: 8 / 3 / 9)."""

_UNET_CLASSES = {"SD1": ("SD15", "SD15_instructpix2pix", "SD20", "SD21UnclipL", "SD21UnclipH"),
                 "SDXL": ("SDXL", "SDXL_instructpix2pix")}
"""model_config classes (comfy/supported_models.py) with the SD1.x / SDXL UNet block layout."""

_UNET_STACKS = (("input_blocks", "IN", None), ("middle_block", "M", "MID"), ("output_blocks", "OUT", None))


@dataclass(frozen=True)
class DitLayout:
    """The block stacks of one DiT family: ``(weight-key prefix after diffusion_model., per-block id stem, group
    id)`` in vector order, e.g. ``("double_blocks", "D", "DOUBLE")``: ``double_blocks.3.*`` is block ``D03`` of
    group ``DOUBLE``; and the model_config classes (comfy/supported_models.py) that have it."""

    stacks: tuple[tuple[str, str, str], ...]
    classes: tuple[str, ...]


_DOUBLE_SINGLE = (("double_blocks", "D", "DOUBLE"), ("single_blocks", "S", "SINGLE"))
DIT_LAYOUTS = (
    DitLayout(_DOUBLE_SINGLE, ("Flux", "FluxInpaint", "FluxSchnell", "Flux2", "Chroma", "ChromaRadiance")),
    DitLayout(_DOUBLE_SINGLE, ("HunyuanVideo", "HunyuanVideoI2V", "HunyuanVideoSkyreelsI2V")),
    DitLayout((("double_stream_blocks", "D", "DOUBLE"), ("single_stream_blocks", "S", "SINGLE")), ("HiDream",)),
    DitLayout((("joint_blocks", "B", "BLOCKS"),), ("SD3",)),
    DitLayout((("blocks", "B", "BLOCKS"),), ("WAN21_T2V", "WAN21_I2V", "WAN22_T2V", "WAN21_FunControl2V",
                                             "WAN21_Camera", "WAN22_Camera", "WAN21_Vace", "WAN21_HuMo", "WAN22_S2V",
                                             "WAN22_Animate")),
    DitLayout((("transformer_blocks", "B", "BLOCKS"),), ("QwenImage", "LTXV")),
    DitLayout((("layers", "B", "BLOCKS"),), ("Lumina2", "ZImage")),
)
"""Block stacks of the DiT families, read from ComfyUI's models (comfy/ldm: flux/model.py, chroma/model.py,
chroma_radiance/model.py, hunyuan_video/model.py ``double_blocks``/``single_blocks``; hidream/model.py
``double_stream_blocks``/``single_stream_blocks``; modules/diffusionmodules/mmdit.py ``joint_blocks``;
wan/model.py ``blocks``; qwen_image/model.py and lightricks/model.py ``transformer_blocks``; lumina/model.py
``layers``). Everything else of these models (embedders, final layers, Wan's ``vace_blocks``, HunyuanVideo's token
refiner, Lumina's noise/context refiners) gets BASE."""

_NUMBER = re.compile(r"-?\d+(\.\d+)?")  # Inspire's is_numeric_string

PRESETS = {
    "SD-NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "SD-ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "SD-INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "SD-IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "SD-INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "SD-MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "SD-MIDD0.2": "1,0,0,0,0,0,0.2,0.4,0.4,0.2,0,0,0,0,0,0,0",
    "SD-MIDD0.8": "1,0,0,0,0,0.5,0.8,0.8,0.4,0,0,0,0,0,0,0,0",
    "SD-MOUT": "1,0,0,0,0,0,1,1,1,1,1,1,1,1,0.5,0,0",
    "SD-OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "SD-OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "SD-OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "SD-ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    "SD-LyC-NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "SD-LyC-ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "SD-LyC-INALL": "1,1,1,1,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "SD-LyC-MIDALL": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0",
    "SD-LyC-OUTALL": "1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1",
    "SDXL-NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "SDXL-ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "SDXL-INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "SDXL-MIDALL": "1,0,0,0,0,1,0,0,0,0,0,0",
    "SDXL-OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "SDXL-LyC-NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "SDXL-LyC-ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "SDXL-LyC-INALL": "1,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0",
    "SDXL-LyC-MIDALL": "1,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0",
    "SDXL-LyC-OUTALL": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    # this pack's, group form of the double/single DiTs (BASE, DOUBLE, SINGLE)
    "FLUX-DOUBLE": "1,1,0",
    "FLUX-SINGLE": "1,0,1",
}
"""Preset name -> vector: Inspire's numeric presets, verbatim from resources/lbw-preset.txt (ComfyUI-Inspire-Pack
at 30974e69), and this pack's FLUX-DOUBLE / FLUX-SINGLE."""

_NOT_SUPPORTED_PRESETS = {
    "SD-ROUT": "it draws random values (R)", "SD-AOUT": "it uses Inspire's A input",
    "SD-AB": "it uses Inspire's A and B inputs", "FLUX-DBL-FRONT": "", "FLUX-DBL-MID": "", "FLUX-DBL-TAIL": ""}
_FLUX_DBL = ("Inspire gives its 18 values to the blocks a LoRA happens to touch, so its meaning depends on the "
             "file; use FLUX-DOUBLE / FLUX-SINGLE or a per-block vector (BASE, then one value per double block, "
             "then per single block)")
_SYMBOLS = {"R": "random values", "U": "random values", "A": "Inspire's A input", "B": "Inspire's B input"}


@dataclass(frozen=True)
class Blocks:
    """A parsed ``blocks`` value: ``text`` (normalised: label, then the preset name or the values joined by
    commas, spaces dropped), the preset name or None, and ``weights`` (floats, BASE first)."""

    text: str
    preset: str | None
    weights: tuple[float, ...]

    @property
    def base(self) -> float:
        """BASE, the weight of the text encoder and of the keys outside the blocks."""
        return self.weights[0]


def parse(value, field: str) -> Blocks | None:
    """A row's ``blocks`` value (see the module docstring): None for absent/null/"" (no block weights).

    Args: value: the JSON value; field: its name for messages (``lora_2.blocks``).
    Raises:
        ValueError (naming ``field``): not a string, an unknown or unsupported preset, a value that is not a
            number in Inspire's syntax (or is R/U/A/B, a sub-vector, the % syntax), |w| > MAX_WEIGHT, more than
            one ``:``. The length is checked against the model later (``ModelBlocks.check``).
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string (a preset name such as SD-INALL, or comma-separated numbers), "
                         f"got {shown(value)}")
    text = value.strip()
    if not text:
        return None
    if text.startswith("%"):
        raise ValueError(f"{field}: Inspire's '%' block spec syntax is not supported; write the vector itself "
                         f"(BASE first, comma-separated), got {shown(value)}")
    label, _, body = text.rpartition(":")
    if ":" in label:
        raise ValueError(f"{field} has more than one ':' ({shown(value)}); write LABEL:values or just the values")
    label, body = label.strip(), body.strip()
    if not body:
        raise ValueError(f"{field} has nothing after {shown(label + ':')}; write LABEL:values or LABEL:PRESET")
    prefix = f"{label}:" if label else ""
    if "," not in body and body[0] not in "+-.0123456789":
        return Blocks(prefix + body, body, _preset(body, field))
    weights = tuple(_number(token.strip(), i, field) for i, token in enumerate(body.split(",")))
    return Blocks(prefix + ",".join(token.strip() for token in body.split(",")), None, weights)


def _preset(name: str, field: str) -> tuple[float, ...]:
    """The weights of preset ``name``. Raises ValueError naming ``field`` for an unsupported or unknown name."""
    if name in PRESETS:
        return tuple(float(x) for x in PRESETS[name].split(","))
    if name in _NOT_SUPPORTED_PRESETS:
        reason = _NOT_SUPPORTED_PRESETS[name] or _FLUX_DBL
        raise ValueError(f"{field}: Inspire's preset {name} is not supported here: {reason}"
                         f"{'; write the numbers instead' if _NOT_SUPPORTED_PRESETS[name] else ''}")
    raise ValueError(f"{field}: unknown preset {shown(name)}; use one of {', '.join(PRESETS)}, or comma-separated "
                     "numbers (BASE first)")


def _number(token: str, i: int, field: str) -> float:
    """Value ``i`` of a vector: Inspire's number syntax, ``|w| <= MAX_WEIGHT``. Raises ValueError naming ``field``."""
    if _NUMBER.fullmatch(token):
        weight = float(token)
        if abs(weight) > MAX_WEIGHT:
            raise ValueError(f"{field}: value {i + 1} ({token}) is beyond +-{MAX_WEIGHT:g}")
        return weight
    if token.upper() in _SYMBOLS:
        raise ValueError(f"{field}: value {i + 1} is {token!r} ({_SYMBOLS[token.upper()]} in Inspire's LoRA Block "
                         "Weight), which is not supported; write a number")
    if " " in token:
        raise ValueError(f"{field}: value {i + 1} ({shown(token)}) is a space-separated sub-vector, which is not "
                         "supported; give one number per block")
    raise ValueError(f"{field}: value {i + 1} ({shown(token)}) is not a number (e.g. 0, 1, 0.5, -0.25)")


_BLOCK_KEY = re.compile(r"diffusion_model\.([a-z_]+)\.(\d+)\.")
"""A weight key inside a numbered block of the diffusion model: (stack, block number)."""


@dataclass
class ModelBlocks:
    """The block table of one diffusion model: its model_config class name (``arch``), the accepted vector
    lengths with their block ids (``forms``: {length: ids, BASE first}; empty when the architecture has no
    table), and per-key lookups cached per form (the first call per key runs the regex).

    Built from the model's weight keys (``diffusion_model.*``): a DiT's per-block form has one id per distinct
    block number found in each stack."""

    arch: str
    forms: dict[int, tuple[str, ...]]
    stacks: tuple[tuple[str, str, str | None], ...]
    _slots: dict = field(default_factory=dict, repr=False)  # {length: {block id: position}}
    _positions: dict = field(default_factory=dict, repr=False)  # {(length, weight key): position}

    @classmethod
    def of(cls, arch: str, weight_keys) -> "ModelBlocks":
        """The table of a model of class ``arch`` with these weight keys (strings)."""
        for family, classes in _UNET_CLASSES.items():
            if arch in classes:
                return cls(arch, dict(UNET_FORMS[family]), _UNET_STACKS)
        layout = next((x for x in DIT_LAYOUTS if arch in x.classes), None)
        if layout is None:
            return cls(arch, {}, ())
        found: dict[str, set[int]] = {prefix: set() for prefix, _, _ in layout.stacks}
        for key in weight_keys:
            match = _BLOCK_KEY.match(key)
            if match and match[1] in found:
                found[match[1]].add(int(match[2]))
        groups = ("BASE", *(group for _, _, group in layout.stacks))
        per_block = ("BASE", *(f"{stem}{n:02d}" for prefix, stem, _ in layout.stacks for n in sorted(found[prefix])))
        return cls(arch, {len(groups): groups, len(per_block): per_block}, layout.stacks)

    def check(self, blocks: Blocks) -> None:
        """Raise ValueError unless ``blocks`` has one of this model's lengths (the message names the value count,
        the architecture and each accepted length with its block ids)."""
        if not self.forms:
            raise ValueError(f"blocks {shown(blocks.text)}: per-block weights are not defined for {self.arch} models; "
                             f"they are for {', '.join(supported_archs())}. Clear the row's blocks")
        if len(blocks.weights) not in self.forms:
            accepted = " or ".join(f"{n} ({_compact(ids)})" for n, ids in sorted(self.forms.items()))
            raise ValueError(f"blocks {shown(blocks.text)} has {len(blocks.weights)} values; for {self.arch} it "
                             f"takes {accepted}")

    def weight(self, key: str, blocks: Blocks) -> float:
        """The weight of diffusion-model weight ``key`` under ``blocks`` (already ``check``-ed): its block's
        value, or BASE for a key outside the blocks this form lists."""
        n = len(blocks.weights)
        position = self._positions.get((n, key))
        if position is None:
            slots = self._slots.get(n)
            if slots is None:
                slots = self._slots[n] = {b: i for i, b in enumerate(self.forms[n])}
            position = self._positions[n, key] = next((slots[b] for b in self._ids(key) if b in slots), 0)
        return blocks.weights[position]

    def _ids(self, key: str) -> tuple[str, ...]:
        """Block ids ``key`` may go by, most specific first (``D03``, ``DOUBLE``), or () outside the blocks."""
        match = _BLOCK_KEY.match(key)
        for prefix, stem, group in self.stacks if match else ():
            if match[1] == prefix:
                block = f"{stem}{int(match[2]):02d}"
                return (block, group) if group else (block,)
        return ()


def supported_archs() -> list[str]:
    """The model_config class names that have a block table."""
    return [*(c for classes in _UNET_CLASSES.values() for c in classes), *(c for x in DIT_LAYOUTS for c in x.classes)]


def _compact(ids) -> str:
    """Block ids for a message, runs of three or more written as ``OUT03..OUT11``."""
    out, run = [], []
    for block in (*ids, None):
        stem, number = _split(block)
        if run and (stem != _split(run[-1])[0] or number != _split(run[-1])[1] + 1):
            out.append(f"{run[0]}..{run[-1]}" if len(run) >= 3 else ", ".join(run))
            run = []
        if block is not None:
            run.append(block)
    return ", ".join(out)


def _split(block) -> tuple[str | None, int | None]:
    match = re.fullmatch(r"([A-Z]+)(\d+)", block or "")
    return (match[1], int(match[2])) if match else (block, None)
