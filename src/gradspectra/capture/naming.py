"""Parameter names parsed into ``(layer index, component)``: what a layer profile is drawn over."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from torch import nn

#: Segments that hold the repeated block list of a model: ``model.layers.12``, ``bert.encoder.layer.3``,
#: ``transformer.h.5``, ``encoder.block.2``, ``vit.blocks.7``, ``visual.transformer.resblocks.0``.
LAYER_CONTAINERS: frozenset[str] = frozenset(
    {
        "layers",
        "layer",
        "h",
        "blocks",
        "block",
        "resblocks",
        "transformer_blocks",
        "encoder",
        "decoder",
        "transformer",
    }
)

#: Segments that wrappers insert into a path (``torch.compile``, FSDP1, activation checkpointing); they are
#: skipped when parsing so that a layer keeps its component however the model is wrapped.
WRAPPER_SEGMENTS: frozenset[str] = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})

_SUFFIXES = (".weight", ".bias")


def _is_index(segment: str) -> bool:
    return segment.isascii() and segment.isdigit()


def _strip_suffix(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _candidates(segments: list[str]) -> list[int]:
    """Positions that may hold the layer index, in the order they are tried (rules 2 and 3 of the docs)."""
    last = len(segments) - 1
    after_container = [
        i for i, s in enumerate(segments) if i > 0 and _is_index(s) and segments[i - 1].lower() in LAYER_CONTAINERS
    ]
    # an index needs something to name the component by: a segment before it or a path after it
    anywhere = [i for i, s in enumerate(segments) if _is_index(s) and (i > 0 or i < last) and i not in after_container]
    return after_container + anywhere


def _split(name: str) -> tuple[list[str], int | None]:
    """Path segments (suffix stripped) and the position of the layer-index segment, if any."""
    stripped = _strip_suffix(name)
    segments = [s for s in stripped.split(".") if s not in WRAPPER_SEGMENTS] or [stripped]
    candidates = _candidates(segments)
    return segments, (candidates[0] if candidates else None)


_Signature = tuple[object, ...]


def _signature(block: nn.Module, path: Sequence[str]) -> _Signature | None:
    """What ``path`` (a parameter, buffer or module) is inside ``block``: classes and shapes; None if absent."""
    owner = block
    for segment in path[:-1]:
        child = owner._modules.get(segment)
        if child is None:
            return None
        owner = child
    if not path:
        leaf: object = block
    else:
        leaf = owner._parameters.get(path[-1])
        if leaf is None:
            leaf = owner._buffers.get(path[-1])
        if leaf is None:
            leaf = owner._modules.get(path[-1])
        if leaf is None:
            return None
    if isinstance(leaf, nn.Module):
        shapes = tuple((n, tuple(p.shape)) for n, p in leaf.named_parameters(recurse=False))
        return (type(block), type(leaf), shapes)
    return (type(block), type(owner), tuple(getattr(leaf, "shape", ())))


class _Blocks:
    """Which numeric segments of a model's names index repeated blocks (rule 4 of the docs)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._counts: dict[tuple[tuple[str, ...], tuple[str, ...]], Counter[_Signature | None]] = {}

    def _module(self, path: Sequence[str]) -> nn.Module | None:
        module: nn.Module | None = self.model
        for segment in path:
            module = module._modules.get(segment) if module is not None else None
        return module

    def resolves(self, raw: list[str]) -> bool:
        return _signature(self.model, raw) is not None

    def repeated(self, raw: list[str], r: int) -> bool:
        """Whether ``raw[r]`` numbers a block that has a twin at ``raw[r + 1:]`` in another numbered sibling.

        A twin is a sibling of the same class whose module at the same relative path is of the same
        class and whose tensor there has the same shape. A container with a single numbered child
        counts as repeated when it is named as a block list (:data:`LAYER_CONTAINERS`): a one-layer
        transformer keeps its ``layer_00``.
        """
        container = self._module(raw[:r])
        if container is None:
            return False
        blocks = {k: m for k, m in container._modules.items() if m is not None and _is_index(k)}
        block = blocks.get(raw[r])
        if block is None:
            return False
        rel = tuple(raw[r + 1 :])
        own = _signature(block, rel)
        if own is None:
            return False
        if len(blocks) == 1:
            return r > 0 and raw[r - 1].lower() in LAYER_CONTAINERS
        key = (tuple(raw[:r]), rel)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = Counter(_signature(b, rel) for b in blocks.values())
        return counts[own] >= 2

    def split(self, name: str) -> tuple[list[str], int | None]:
        """:func:`_split`, keeping only an index that numbers repeated blocks (the first such candidate)."""
        segments, first = _split(name)
        raw = name.split(".")
        if first is None or not self.resolves(raw):
            return segments, first  # not a name of this model: the name alone decides
        stripped = _strip_suffix(name).split(".")
        kept = [k for k, s in enumerate(stripped) if s not in WRAPPER_SEGMENTS]
        if len(kept) != len(segments):
            return segments, first
        for i in _candidates(segments):
            if self.repeated(raw, kept[i]):
                return segments, i
        return segments, None


def _component(segments: list[str], i: int) -> str:
    return ".".join(segments[i + 1 :]) or segments[i - 1]


def parse_layer_name(name: str) -> tuple[int | None, str]:
    """Split a parameter (or module) name into its layer index and its component.

    The rule, applied to the dotted path after a trailing ``.weight`` / ``.bias`` and any wrapper
    segment (:data:`WRAPPER_SEGMENTS`, e.g. ``_orig_mod`` from ``torch.compile``) are dropped:

    1. The layer index is the *first* numeric segment that follows a block-list segment named in
       :data:`LAYER_CONTAINERS` (``layers``, ``layer``, ``h``, ``blocks``, ``block``, ...). The first,
       not the last, so that the index is the one of the model's top-level repeated block:
       T5's ``encoder.block.2.layer.0`` is block 2.
    2. Failing that, the first numeric segment anywhere (torchvision ``features.3.conv.0`` gives 3);
       a path that is a bare number (a top-level ``nn.Sequential`` child, ``"0"``) has no index.
    3. The component is the path after the index; when nothing follows it (``features.3``), the
       segment before it (``features``). Without an index the component is the whole path.

    A single name cannot tell an encoder block from a decoder block (T5 ``encoder.block.2...`` and
    ``decoder.block.2...`` both give block 2). :func:`parse_layer_names`, which sees every name of a
    model, qualifies such components with their stack. Nor can it tell repeated blocks from a
    ``Sequential`` of different layers (``head.1`` a 64 x 1024 ``Linear``, ``head.3`` a 10 x 64 one):
    :func:`parse_layer_names` given the model keeps an index only where the blocks repeat.

    Example:
        >>> parse_layer_name("model.layers.12.self_attn.q_proj.weight")
        (12, 'self_attn.q_proj')
        >>> parse_layer_name("bert.encoder.layer.3.attention.self.query")
        (3, 'attention.self.query')
        >>> parse_layer_name("transformer.h.5.attn.c_attn")
        (5, 'attn.c_attn')
        >>> parse_layer_name("encoder.block.2.layer.0.SelfAttention.q.weight")
        (2, 'layer.0.SelfAttention.q')
        >>> parse_layer_name("features.3.0.conv")
        (3, '0.conv')
        >>> parse_layer_name("lm_head.weight")
        (None, 'lm_head')
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a str, got {name!r}")
    segments, i = _split(name)
    if i is None:
        return None, ".".join(segments)
    return int(segments[i]), _component(segments, i)


def _stack(segments: list[str], i: int) -> tuple[str, ...]:
    """The path that leads to the layer index: ``("encoder", "block")`` for T5's encoder."""
    return tuple(segments[:i])


def _labels(stacks: set[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """Short distinct names for stacks: their paths with the segments all of them share at both ends cut off."""
    paths = sorted(stacks)
    shortest = min(len(p) for p in paths)
    head = 0
    while head < shortest and len({p[head] for p in paths}) == 1:
        head += 1
    tail = 0
    while tail < shortest - head and len({p[len(p) - 1 - tail] for p in paths}) == 1:
        tail += 1
    short = {p: ".".join(p[head : len(p) - tail]) for p in paths}
    if "" in short.values() or len(set(short.values())) < len(paths):
        return {p: ".".join(p) for p in paths}
    return short


def parse_layer_names(names: Iterable[str], model: nn.Module | None = None) -> dict[str, tuple[int | None, str]]:
    """:func:`parse_layer_name` for every name of one model, with components made unique across stacks.

    When two names in *different* stacks (the path before the layer index, e.g. ``encoder.block``
    and ``decoder.block``) parse to the same ``(index, component)``, every name in those stacks gets
    its component prefixed by a short stack label: the stack path less the segments that all the
    colliding stacks share at the start and at the end. So T5 gives ``encoder.layer.0.SelfAttention.q``
    and ``decoder.layer.0.SelfAttention.q``, BART ``encoder.self_attn.q_proj`` and
    ``decoder.self_attn.q_proj``, a ResNet ``layer1.conv1`` ... ``layer4.conv1``. Models with one block
    list (Llama, Qwen2, BERT, GPT-2, OPT) keep :func:`parse_layer_name`'s result unchanged. If cutting
    shared segments would leave a label empty or ambiguous, the full stack path is the label.

    Pass every parameter name of the model (``named_parameters(remove_duplicate=False)``), not a
    filtered subset, so that the components do not depend on which parameters are watched.

    **Repeated blocks only** (with ``model``, as :func:`~gradspectra.capture.select_parameters`
    calls it). A numeric segment is a layer index only when it numbers one of repeated blocks: the
    numbered child it names has a *twin*, another numbered child of the same container, of the same
    class, holding at the same relative path a module of the same class and a tensor of the same
    shape. Candidates are tried in the order above; the first that numbers repeated blocks is the
    index, and a name with none has no index (its component is its whole path). So the blocks of a
    transformer (``model.layers.0`` ... ``model.layers.N``) stay layers of one component, while the
    ``Linear`` layers of a ``head = nn.Sequential(nn.Flatten(), nn.Linear(1024, 64), nn.ReLU(),
    nn.Linear(64, 10))`` keep their own names ``head.1`` and ``head.3``. A container with a single
    numbered child counts as repeated only when it is named in :data:`LAYER_CONTAINERS` (a one-layer
    transformer keeps ``layer_00``). Names that are not paths of ``model`` are parsed from the name alone.

    Example:
        >>> parsed = parse_layer_names(["encoder.block.0.layer.0.SelfAttention.q.weight",
        ...                             "decoder.block.0.layer.0.SelfAttention.q.weight",
        ...                             "lm_head.weight"])
        >>> parsed["decoder.block.0.layer.0.SelfAttention.q.weight"]
        (0, 'decoder.layer.0.SelfAttention.q')
        >>> parsed["lm_head.weight"]
        (None, 'lm_head')
        >>> parse_layer_names(["model.layers.0.mlp.up_proj.weight"])
        {'model.layers.0.mlp.up_proj.weight': (0, 'mlp.up_proj')}
        >>> head = nn.Sequential(nn.Flatten(), nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> parse_layer_names(["head.1.weight", "head.3.weight"], nn.ModuleDict({"head": head}))
        {'head.1.weight': (None, 'head.1'), 'head.3.weight': (None, 'head.3')}
        >>> parse_layer_names(["head.1.weight", "head.3.weight"])  # from the names alone
        {'head.1.weight': (1, 'head'), 'head.3.weight': (3, 'head')}
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module or None, got {model!r}")
    blocks = _Blocks(model) if model is not None else None
    split: dict[str, tuple[list[str], int | None]] = {}
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"`names` must hold str, got {name!r}")
        split[name] = blocks.split(name) if blocks is not None else _split(name)

    stacks_of_key: dict[tuple[int, str], set[tuple[str, ...]]] = {}
    for segments, i in split.values():
        if i is not None:
            key = (int(segments[i]), _component(segments, i))
            stacks_of_key.setdefault(key, set()).add(_stack(segments, i))
    colliding: set[tuple[str, ...]] = set()
    for stacks in stacks_of_key.values():
        if len(stacks) > 1:
            colliding |= stacks
    labels = _labels(colliding) if colliding else {}

    parsed: dict[str, tuple[int | None, str]] = {}
    for name, (segments, i) in split.items():
        if i is None:
            parsed[name] = (None, ".".join(segments))
            continue
        component = _component(segments, i)
        label = labels.get(_stack(segments, i), "")
        parsed[name] = (int(segments[i]), f"{label}.{component}" if label else component)
    return parsed
