"""From the node's inputs to a fused plan: entries -> files -> ComfyUI key maps -> factors per weight key.

Key mapping and file-format parsing are ComfyUI's own (``comfy.lora.model_lora_keys_unet/_clip``,
``comfy.lora_convert.convert_lora`` and ``comfy.lora.load_lora`` with its adapters in ``comfy.weight_adapter``), so
every LoRA naming scheme and format the host maps (kohya/sd-scripts, diffusers, PEFT, LyCORIS, ...; SD1.x, SDXL,
SD3, Flux, ...) is read exactly as stock LoraLoader reads it. The pack adds the PEFT UNet attention names
ComfyUI 0.3.75 lacks (``_unet_key_map``) and the trainer layouts of ``nodes/layouts.py``, and does its own merge
(``core.fuse``) and lifecycle.
"""
from __future__ import annotations

import itertools
import logging
import math
import ntpath
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import folder_paths
import comfy.lora
import comfy.utils
import comfy.weight_adapter

from . import blocks as block_weights
from . import layouts
from ..core import (DiffFactors, DoraFactors, Factors, FuseError, LoraFactors, LoraFileCache, LoraFileError,
                    LohaFactors, LokrFactors, SliceFactors, UnsupportedTarget, per_tree, resolve, shown)

__all__ = ["LoraEntry", "LoraMatch", "parse_entries", "build_plans", "lora_path", "within_loras", "is_row_key",
           "FILES", "MAX_STRENGTH", "ROW_SHAPES", "NOT_A_ROW"]

log = logging.getLogger("comfyui-batch-lora")

FILES = LoraFileCache()
"""The parsed-LoRA cache shared by every node of this pack."""

TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "lora_prior_te")
"""Tensor-name prefixes of text-encoder modules in the naming schemes ComfyUI's clip key map reads
(comfy/lora.py ``model_lora_keys_clip``: kohya ``lora_te_/lora_te1_/lora_te2_/lora_te3_``, diffusers/PEFT
``text_encoder./text_encoder_2.``, ``text_encoders.``, Cascade ``lora_prior_te_``); used only to tell "no CLIP
connected" apart from "unmatched" in the report."""

MAX_STRENGTH = 100.0
"""Strengths beyond +-MAX_STRENGTH are rejected as input mistakes (a real LoRA is used at |s| <= ~5)."""


@dataclass(frozen=True)
class LoraEntry:
    """One row of the loader: file name (relative to a loras folder), strengths (dimensionless), on/off, where it
    came from, for messages (``lora_2``, ``lora_stack[0]``), and its per-block weights (``blocks``: the
    normalised text of ``nodes.blocks.parse``, "" = none)."""

    name: str
    strength_model: float = 1.0
    strength_clip: float = 1.0
    on: bool = True
    row: str = ""
    blocks: str = ""

    def tag(self) -> str:
        """The entry in A1111 prompt syntax, as A1111 and Civitai write it into image metadata: the file's base
        name without folder or extension, e.g. ``<lora:style:0.8>``. When the strengths differ, A1111's
        two-number form ``<lora:name:strength_clip:strength_model>`` (A1111 reads the first number as the
        text-encoder multiplier, the second as the UNet's; readers that take only one number see the clip
        strength). Source: AUTOMATIC1111 extensions-builtin/Lora/networks.py (``te``/``unet`` multipliers)."""
        stem = os.path.splitext(os.path.basename(self.name.replace("\\", "/")))[0]
        if self.strength_clip == self.strength_model:
            return f"<lora:{stem}:{self.strength_model:g}>"
        return f"<lora:{stem}:{self.strength_clip:g}:{self.strength_model:g}>"


@dataclass
class LoraMatch:
    """What one LoRA file matched: the architecture its keys were mapped for (the model's ComfyUI model_config
    class, e.g. ``SD15``, ``SDXL``), weight keys touched in the UNet / text encoder, patches per format (``lora``,
    ``loha``, ``lokr``, ``diff``, ``dora``; one per LoRA module), how many of those patch row slices of fused
    weights (``SliceFactors``: Flux/SD3 q/k/v in diffusers layout), the file's tensors left unmatched (names), and
    text-encoder tensors skipped because no CLIP is connected (count)."""

    entry: LoraEntry
    arch: str = "?"
    unet_keys: int = 0
    clip_keys: int = 0
    kinds: Counter = field(default_factory=Counter)
    slices: int = 0
    unmatched: list[str] = field(default_factory=list)
    skipped: int = 0

    def line(self, limit: int | None = 20) -> str:
        """One report line, e.g. ``style.safetensors  model 0.8 clip 1  unet 24 keys, clip 12 keys, 0 unmatched
        (for SD15; lora 36)`` (``blocks <value>`` after the strengths when the row has block weights), then
        ``: name, name, ...`` for unmatched tensors (at most ``limit`` of them named)."""
        e = self.entry
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items()))
        sliced = f"; {self.slices} on slices of fused weights" if self.slices else ""
        text = (f"{e.name}  model {e.strength_model:g} clip {e.strength_clip:g}"
                f"{'  blocks ' + e.blocks if e.blocks else ''}  unet {self.unet_keys} keys, "
                f"clip {self.clip_keys} keys, {len(self.unmatched)} unmatched  (for {self.arch}"
                f"{'; ' + kinds if kinds else ''}{sliced})")
        if self.skipped:
            text += f", {self.skipped} text-encoder tensors skipped (no CLIP connected)"
        if self.unmatched:
            shown = self.unmatched if limit is None else self.unmatched[:limit]
            more = len(self.unmatched) - len(shown)
            text += ": " + ", ".join(shown) + (f" ... ({more} more)" if more else "")
        return text


ROW_SHAPES = ('{"on": true, "lora": "file.safetensors", "strength_model": 1.0, "strength_clip": 1.0}, or rgthree '
              'Power Lora Loader\'s {"on": true, "lora": "file.safetensors", "strength": 1.0, "strengthTwo": 1.0}')
NOT_A_ROW = "__batch_lora_not_a_row__"
"""Key under which ``nodes.guard_prompt`` keeps a list given as a row (``{NOT_A_ROW: value}``), so that ComfyUI
does not take it for a node link; ``parse_entries`` refuses it like any other non-object."""


def is_row_key(key) -> bool:
    """Whether an input name is a loader row: ``lora_<digits>``."""
    return isinstance(key, str) and key.startswith("lora_") and key[5:].isdigit()


def _strength(value, field: str) -> float:
    """The coercion table's strength: a JSON number (int or float; not a boolean, not a string), finite,
    ``|s| <= MAX_STRENGTH``. Raises ValueError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number, got {shown(value)}")
    number = float(value)
    if not math.isfinite(number) or abs(number) > MAX_STRENGTH:
        raise ValueError(f"{field} = {shown(value)} is not a usable strength (finite, |s| <= {MAX_STRENGTH:g})")
    return number


def _clip_strength(value, model: float, field: str) -> float:
    """A clip strength: absent or null means the model strength, else as ``_strength``."""
    return model if value is None else _strength(value, field)


def _name(value, field: str) -> str | None:
    """A file name: a non-empty string; null, "" and "None" (an empty row of the UI) give None (row skipped)."""
    if value is None or value in ("", "None"):
        return None
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a file name (a string), got {shown(value)}")
    return value


def _row(key: str, row) -> LoraEntry | None:
    """One ``lora_N`` row through the coercion table (README "Row values"), or None for a row that is off or
    names no file. Raises ValueError naming the row and field."""
    if not isinstance(row, dict) or NOT_A_ROW in row:
        raise ValueError(f"{key} must be an object like {ROW_SHAPES}; got "
                         f"{shown(row[NOT_A_ROW] if isinstance(row, dict) else row)}")
    if "lora" not in row:
        raise ValueError(f"{key} has no \"lora\" field; it must be an object like {ROW_SHAPES}")
    on = row.get("on", True)
    if not isinstance(on, bool):
        raise ValueError(f"{key}.on must be true or false, got {shown(on)}")
    name = _name(row["lora"], f"{key}.lora")
    if "strength_model" in row or "strength" not in row:  # this pack's shape
        sm = _strength(row.get("strength_model", 1.0), f"{key}.strength_model")
        sc = _clip_strength(row.get("strength_clip"), sm, f"{key}.strength_clip")
    else:  # rgthree Power Lora Loader's (power_lora_loader.py: strengthTwo is the clip strength)
        sm = _strength(row["strength"], f"{key}.strength")
        sc = _clip_strength(row.get("strengthTwo"), sm, f"{key}.strengthTwo")
    blocks = block_weights.parse(row.get("blocks"), f"{key}.blocks")
    return LoraEntry(name, sm, sc, row=key, blocks=blocks.text if blocks else "") if on and name is not None else None


def parse_entries(rows: dict, lora_stack=None) -> list[LoraEntry]:
    """Normalise the loader's inputs into entries, in order: ``lora_stack`` first, then ``lora_1``, ``lora_2``...
    Every value goes through one strict coercion table (README "Row values"):

    - a row is an object in this pack's shape ``{"on", "lora", "strength_model", "strength_clip"}`` or in rgthree
      Power Lora Loader's ``{"on", "lora", "strength", "strengthTwo"}``; its other keys are ignored;
    - ``on``: true or false (absent: true); ``lora``: a string (null, "" or "None": the row is skipped);
    - strengths: JSON numbers, finite, ``|s| <= MAX_STRENGTH`` (absent model strength: 1.0); a clip strength that
      is absent or null means the model strength;
    - ``blocks``: per-block weights, a string (``nodes.blocks.parse``: preset or comma-separated numbers, optional
      ``LABEL:``); absent, null or "": none. Its length is checked against the model in ``build_plans``;
    - a ``lora_stack`` item (Comfyroll / Efficiency stackers' LORA_STACK) is ``(name, strength_model,
      strength_clip)`` with the same rules.

    Args: rows: ``{"lora_N": row}`` (other keys ignored); lora_stack: optional LORA_STACK list.
    Raises:
        ValueError: anything else, naming the row and the field (values echoed cut short).
    """
    entries = []
    for i, item in enumerate(lora_stack or ()):
        where = f"lora_stack[{i}]"
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise ValueError(f"{where} must be (name, strength_model, strength_clip), got {shown(item)}")
        name = _name(item[0], f"{where} name")
        sm = _strength(item[1], f"{where} strength_model")
        if name is not None:
            entries.append(LoraEntry(name, sm, _clip_strength(item[2], sm, f"{where} strength_clip"), row=where))
    for key in sorted((k for k in rows if is_row_key(k)), key=lambda k: int(k[5:])):
        entry = _row(key, rows[key])
        if entry is not None:
            entries.append(entry)
    return entries


def lora_path(name: str) -> str:
    """Full path of ``name``, a file name relative to one of the loras folders (``folder_paths``).

    ComfyUI 0.3.75's ``folder_paths.get_full_path`` silently rewrites ``../x`` and ``/abs/x`` to ``x`` inside each
    folder and follows links wherever they lead. Here such names are refused instead, and so is a file whose
    real path (links resolved) lies outside every loras folder, so an API prompt can only read files inside them.

    Raises:
        LoraFileError: absolute name, a ``..`` component, the file is missing, or it leads outside the loras
            folders (names the file as given and what to do; the folders and a link's target go to the server
            log only).
    """
    folders = folder_paths.get_folder_paths("loras")
    parts = name.replace("\\", "/").split("/")
    if not name or "\x00" in name or posixpath.isabs(name) or ntpath.isabs(name) or ".." in parts:
        raise LoraFileError(f"LoRA name {shown(name)} must be a file name relative to the loras folder, "
                            "without '..' or an absolute path; pick the file from the list")
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        log.warning("batch-lora: LoRA %r is in none of the loras folders %s", name, folders)
        raise LoraFileError(f"LoRA {shown(name)} is not in the loras folder; check the name")
    real = os.path.realpath(path)
    if not within_loras(real):
        log.warning("batch-lora: LoRA %r is a link to %s, outside the loras folders %s", name, real, folders)
        raise LoraFileError(f"LoRA {shown(name)} is a link that leads outside the loras folder; add that "
                            "folder as a loras path in extra_model_paths.yaml instead of linking to it")
    return path


def within_loras(real: str) -> bool:
    """Whether the resolved path ``real`` (``os.path.realpath``) lies inside one of the loras folders (each
    resolved too): the containment rule of ``lora_path``, also applied to the sidecar files ``nodes/info.py``
    serves."""
    folders = map(os.path.realpath, folder_paths.get_folder_paths("loras"))
    return any(os.path.commonpath([real, d]) == d for d in folders)


def build_plans(model, clip, entries: list[LoraEntry]):
    """Map every entry onto the model's and the text encoder's weight keys.

    Args:
        model: a ComfyUI ModelPatcher (or None); clip: a ComfyUI CLIP (or None).
        entries: enabled entries from ``parse_entries``.
    Returns:
        ``(unet_plan, clip_plan, matches, unet_signature, clip_signature)``: plans map weight key -> list of
        ``(strength, factors)``; a signature is a text naming the files (path, size, mtime) and that side's
        strengths, in order, so a strength_model edit does not re-bake the text encoder and vice versa.
        An entry with ``blocks`` (``nodes.blocks``) puts each term in at its strength times the key's block
        weight: on the diffusion model the weight of the key's block (BASE outside the blocks), on the text
        encoder BASE; a term whose product is 0 is left out. Its signatures carry the weights (the UNet side
        all of them, the text-encoder side BASE). Without a model only BASE is used (no length to check).
    Raises (each message starting with the entry's row, e.g. ``lora_2: ...``):
        LoraFileError: missing or unreadable file, NaN/Inf tensors, or a file with no key for this model.
        ValueError: two entries are the same file (by device and inode: whatever the spelling or link); a
            ``blocks`` vector whose length this architecture does not take, or an architecture without a block
            table (names the value count, the architecture and the accepted lengths with their block ids).
        FuseError: a factor's shape does not fit the model weight (the LoRA is for another architecture).
        UnsupportedTarget: a touched weight is quantized (int8), names the key.
        NotImplementedError: an adapter type this pack does not fuse yet (names file and key).
    """
    unet = per_tree(model.model, _INDEX_ATTR, lambda m: _Index(_unet_key_map(m))) if model is not None else _NONE
    clip_side = per_tree(clip.cond_stage_model, _INDEX_ATTR, lambda m: _Index(comfy.lora.model_lora_keys_clip(m, {}))
                         ) if clip is not None else _NONE
    arch = type((model.model.model_config if model is not None else clip.cond_stage_model)).__name__
    unet_plan: dict[str, list] = {}
    clip_plan: dict[str, list] = {}
    matches, unet_signature, clip_signature = [], [], []
    files: dict[tuple[int, int], LoraEntry] = {}  # (st_dev, st_ino) -> the first entry naming that file
    for entry in entries:
        try:
            blocks = block_weights.parse(entry.blocks, f"{entry.row}.blocks")
            table = unet.blocks(arch) if blocks is not None and model is not None else None
            if table is not None:
                table.check(blocks)
            path = lora_path(entry.name)
            st = os.stat(path)
            first = files.setdefault((st.st_dev, st.st_ino), entry)
            if first is not entry:
                raise ValueError(f"LoRA {shown(entry.name)} is the same file as {first.row} ({shown(first.name)});"
                                 " merge the rows into one (strengths add up)")
            ident = FILES.identity(path, entry.name)
            sides, unmatched = FILES.derived(
                ident, ("on", unet.token, clip_side.token),
                lambda tensors: _checked(entry.name, *_map_file(entry.name, ident, tensors, unet.key_map,
                                                                clip_side.key_map), model, clip), label=entry.name)
            skipped = {k for k in unmatched if k.startswith(TEXT_ENCODER_PREFIXES)} if clip is None else set()
            match = LoraMatch(entry, arch=arch, unmatched=[k for k in unmatched if k not in skipped],
                              skipped=len(skipped))
            unet_weight = (lambda key: table.weight(key, blocks)) if table is not None else _unweighted
            clip_weight = (lambda key: blocks.base) if blocks is not None else _unweighted
            for side, plan, strength, weight in ((sides[0], unet_plan, entry.strength_model, unet_weight),
                                                 (sides[1], clip_plan, entry.strength_clip, clip_weight)):
                if strength != 0.0:
                    for key, factors in side.terms:
                        s = strength * weight(key)  # exactly the strength for a weight 1
                        if s != 0.0:
                            plan.setdefault(key, []).append((s, factors))
                match.kinds.update(side.kinds)
                match.slices += side.slices
            match.unet_keys, match.clip_keys = sides[0].keys, sides[1].keys
        except (LoraFileError, ValueError, UnsupportedTarget, NotImplementedError) as exc:
            raise type(exc)(f"{entry.row}: {exc}") from exc
        matches.append(match)
        unet_signature.append(f"{ident}:{entry.strength_model!r}" + (f"*{blocks.weights!r}" if blocks else ""))
        clip_signature.append(f"{ident}:{entry.strength_clip!r}" + (f"*{blocks.base!r}" if blocks else ""))
    return unet_plan, clip_plan, matches, "|".join(unet_signature), "|".join(clip_signature)


def _unweighted(key: str) -> float:
    """The block weight of every key of an entry without ``blocks``."""
    return 1.0


_INDEX_ATTR = "_batch_lora_index"
_TOKENS = itertools.count()


class _Index:
    """ComfyUI's LoRA key map of one torch model (``{LoRA module name: weight key}``) and a ``token`` no other
    index ever has; kept on the model per module tree (``per_tree``), so a re-executed loader neither rebuilds the
    map nor re-maps and re-checks a file it has already read for this model (``FILES.derived`` under the tokens,
    dropped with the file)."""

    def __init__(self, key_map: dict):
        self.key_map = key_map
        self.token = next(_TOKENS)
        self._blocks = None

    def blocks(self, arch: str) -> block_weights.ModelBlocks:
        """The model's block table (``nodes.blocks.ModelBlocks``), built once from the keys this map targets
        (ComfyUI maps every state-dict key of the diffusion model), its per-key lookups cached with it."""
        if self._blocks is None:
            self._blocks = block_weights.ModelBlocks.of(arch, {_key_of(k) for k in self.key_map.values()})
        return self._blocks


_NONE = _Index({})  # no model / no CLIP connected


@dataclass(frozen=True)
class _Side:
    """One file on one side (UNet or text encoder) of the models, shape-checked: ``(weight key, factors)`` per
    patch, in file order; patches per format; patches on slices of fused weights; distinct weight keys."""

    terms: tuple
    kinds: Counter
    slices: int
    keys: int


def _checked(name: str, mapped, unmatched, model, clip) -> tuple[tuple[_Side, _Side], list[str]]:
    """``((UNet side, text-encoder side), unmatched)`` of a file mapped by ``_map_file``, every factor checked
    against its weight's shape. Raises FuseError (naming the file and key) for a factor that does not fit."""
    sides = []
    for in_unet, root in ((True, model.model if model is not None else None),
                          (False, clip.patcher.model if clip is not None else None)):
        terms, kinds, slices = [], Counter(), 0
        for key, factors, unet in mapped:
            if unet != in_unet:
                continue
            try:
                factors.check(key, tuple(resolve(root, key).param.shape))
            except FuseError as exc:
                raise FuseError(f"LoRA {shown(name)}: {exc}") from exc
            terms.append((key, factors))
            sliced = type(factors) is SliceFactors
            kinds[_KINDS[type(factors.inner if sliced else factors)]] += 1
            slices += sliced
        sides.append(_Side(tuple(terms), kinds, slices, len({key for key, _ in terms})))
    return (sides[0], sides[1]), unmatched


def _unet_key_map(model) -> dict:
    """ComfyUI's LoRA key map for the diffusion model (``comfy.lora.model_lora_keys_unet``), plus the PEFT UNet
    attention names ComfyUI 0.3.75 lacks.

    For every diffusers UNet weight ``<path>.weight`` (``comfy.utils.unet_to_diffusers`` of the model's
    unet_config) ComfyUI maps ``<path>`` and ``unet.<path>`` only after rewriting ``.to_`` to ``.processor.to_``
    (and ``.processor.to_out.0`` to ``.processor.to_out``), the attention-processor names of old diffusers
    ``save_attn_procs`` files. PEFT / diffusers ``save_lora_weights`` files name the attention projections
    ``[unet.]<block>.attn{1,2}.to_{q,k,v}`` and ``.to_out.0`` instead; exactly those names (both prefixes, every
    path containing ``.to_``) are added here, mapping to the same weight keys. Names ComfyUI already maps are left
    as ComfyUI has them; then the trainer layouts ComfyUI misses (``layouts.extra_names``).

    Args: model: a ComfyUI ``BaseModel`` (``ModelPatcher.model``). Returns: ``{LoRA module name: weight key}``.
    """
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    for path, ldm in comfy.utils.unet_to_diffusers(model.model_config.unet_config).items():
        if path.endswith(".weight") and ".to_" in path:
            for prefix in ("", "unet."):
                key_map.setdefault(prefix + path[:-len(".weight")], f"diffusion_model.{ldm}")
    key_map.update(layouts.extra_names(type(model.model_config).__name__, key_map))
    return key_map


def _map_file(name: str, ident: tuple, tensors: dict, unet_map: dict, clip_map: dict):
    """ComfyUI's mapping of one file onto the model: ``([(weight key, factors, is_unet)], unmatched tensor
    names)``. Raises LoraFileError when nothing matches or ComfyUI's parser fails on an incomplete module set
    (e.g. a LoHa ``hada_t1`` without ``hada_t2``), NotImplementedError for adapters not fused here."""
    key_map = {**unet_map, **clip_map}
    tensors = layouts.convert_tensors(tensors)
    try:
        patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    except (KeyError, IndexError, ValueError, RuntimeError, TypeError) as exc:  # ComfyUI's parser on a broken set
        raise LoraFileError(f"LoRA {shown(name)}: its tensors do not form a complete LoRA/LyCORIS module set "
                            f"({type(exc).__name__}: {shown(str(exc), 200)}); the file is incomplete or corrupt - "
                            "re-export it") from exc
    if not patches:
        raise LoraFileError(f"LoRA {shown(name)}: none of its {len(tensors)} tensors match this model (e.g. "
                            f"{', '.join(shown(k, 80) for k in sorted(tensors)[:3])}); it is for another "
                            "architecture or not a LoRA")
    unet_keys = {_key_of(key) for key in unet_map.values()}
    mapped = [(_key_of(key), _factors(name, key, adapter, f"{ident[0]}@{ident[1]}:{ident[2]}:{ident[3]}#{key}"),
               _key_of(key) in unet_keys or _weight_of(key) in unet_keys) for key, adapter in patches.items()]
    matched = {x for x, key in key_map.items() if key in patches or _bias_of(key) in patches}
    return mapped, sorted(k for k in tensors if not _has_prefix(k, matched))


def _key_of(key) -> str:
    """The weight key of a ComfyUI patch key: ``key`` itself, or ``key[0]`` of an offset patch
    ``(key, (dim, start, length)[, function])``."""
    return key if isinstance(key, str) else key[0]


def _weight_of(key):
    """``x.weight`` for a bias key ``x.bias`` (ComfyUI's ``diff_b``/``b_norm`` patches), else None."""
    return key[:-len(".bias")] + ".weight" if isinstance(key, str) and key.endswith(".bias") else None


def _bias_of(key):
    """``x.bias`` for a weight key ``x.weight``, else None."""
    return key[:-len(".weight")] + ".bias" if isinstance(key, str) and key.endswith(".weight") else None


def _has_prefix(tensor_key: str, prefixes: set) -> bool:
    parts = tensor_key.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


_KINDS = {LoraFactors: "lora", LohaFactors: "loha", LokrFactors: "lokr", DiffFactors: "diff", DoraFactors: "dora"}


def _factors(name: str, key, adapter, token: str) -> Factors:
    """This pack's factors for one of ComfyUI's patches (``comfy.lora.load_lora`` output).

    LoRA/LoCon (``LoRAAdapter``), LyCORIS LoHa (``LoHaAdapter``) and LoKr (``LoKrAdapter``), each with an optional
    DoRA ``dora_scale``, and ``("diff", (tensor,))`` patches; the tensors stay views of the file's. Alpha scales
    follow ComfyUI's adapters (comfy/weight_adapter/lora.py, loha.py, lokr.py).

    An offset patch ``((key, (0, start, length)), adapter)`` (ComfyUI's key maps for fused q/k/v weights, see
    ``core.SliceFactors``) gives ``SliceFactors`` around the adapter's factors.

    Raises:
        NotImplementedError: an offset patch along another dim or with a weight function (no ComfyUI key map
            writes one), ``set`` patches, LoRA ``reshape_weight``, OFT/BOFT/GLoRA (names the file and key; the stock
            LoraLoader handles them).
    """
    if not isinstance(key, str):
        weight_key, offset, *function = key
        if offset is None:
            return _factors(name, weight_key, adapter, token)
        if offset[0] != 0 or any(f is not None for f in function):
            raise NotImplementedError(f"LoRA {shown(name)}: {weight_key} gets a patch along dim {offset[0]}"
                                      f"{' with a weight function' if any(function) else ''}, which this pack "
                                      "does not fuse; use the stock LoraLoader for this file")
        return SliceFactors(_factors(name, weight_key, adapter, token), int(offset[1]), int(offset[2]), token)
    if isinstance(adapter, tuple) and adapter[0] == "diff":
        return DiffFactors(adapter[1][0].detach(), token)
    if isinstance(adapter, comfy.weight_adapter.LoRAAdapter):
        up, down, alpha, mid, dora_scale, reshape = adapter.weights
        if reshape is not None:
            raise NotImplementedError(f"LoRA {shown(name)}: {key} uses reshape_weight, which this pack does not fuse "
                                      "yet; use the stock LoraLoader for this file")
        inner = LoraFactors.from_tensors(up, down, alpha, token, mid=mid)
    elif isinstance(adapter, comfy.weight_adapter.LoHaAdapter):
        w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale = adapter.weights
        inner = LohaFactors(w1a, w1b, w2a, w2b, t1, t2, 1.0 if alpha is None else alpha / w1b.shape[0], token)
    elif isinstance(adapter, comfy.weight_adapter.LoKrAdapter):
        w1, w2, alpha, w1a, w1b, w2a, w2b, t2, dora_scale = adapter.weights
        rank = w2b.shape[0] if w2 is None else (w1b.shape[0] if w1 is None else None)
        scale = 1.0 if alpha is None or rank is None else alpha / rank
        inner = LokrFactors(w1, w1a, w1b, w2, w2a, w2b, t2, scale, token)
    else:
        kind = adapter[0] if isinstance(adapter, tuple) else type(adapter).__name__
        raise NotImplementedError(f"LoRA {shown(name)}: {key} is a {kind} patch, which this pack does not fuse yet; "
                                  "use the stock LoraLoader for this file")
    return inner if dora_scale is None else DoraFactors(inner, dora_scale.detach(), token)
