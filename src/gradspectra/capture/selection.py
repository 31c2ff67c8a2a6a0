"""Which weights of a model are watched: module types, name globs, a regex and a predicate."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from torch import nn

from gradspectra.capture.implied import is_linear
from gradspectra.capture.naming import parse_layer_names
from gradspectra.capture.watched import WatchedParameter
from gradspectra.functional.reshape import as_matrix, is_conv1d

#: Module types whose ``weight`` is watched by default. GPT-2 style ``transformers`` ``Conv1D`` is watched
#: too, recognised by :func:`gradspectra.functional.is_conv1d` so that ``transformers`` is never imported here.
DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

_EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)

Predicate = Callable[[str, nn.Parameter, nn.Module], bool]

#: Which gradient a watched weight is measured by: ``"parameters"``, the ``.grad`` of trainable weights (an
#: adapter's own matrices are layers of their own); ``"implied"``, also the full-weight gradient ``D^T X`` of
#: every matched frozen ``nn.Linear`` weight, adapted or not; ``"auto"``, the implied gradient for the frozen
#: base weights that adapters wrap and for frozen weights an explicit filter matched, else as ``"parameters"``.
Gradients = Literal["auto", "implied", "parameters"]
GRADIENTS: tuple[str, ...] = get_args(Gradients)

_BASE = "base_layer"


def adapter_wrappers(model: nn.Module) -> dict[str, str]:
    """Modules that wrap a base layer with adapters (peft's LoRA, DoRA, IA3 layers): path -> adapter names.

    Recognised by structure, so that peft is never imported: a module with a child named ``base_layer`` and
    peft's adapter attributes (``adapter_layer_names`` or ``active_adapters``). The adapter names are its
    ``active_adapters``, joined by ``","``.

    Example:
        >>> class Wrapped(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.base_layer, self.lora_A = nn.Linear(4, 4), nn.Linear(4, 2)
        ...         self.active_adapters = ["default"]
        >>> adapter_wrappers(nn.Sequential(Wrapped()))
        {'0': 'default'}
    """
    wrappers: dict[str, str] = {}
    for path, module in model.named_modules():
        if not isinstance(dict(module.named_children()).get(_BASE), nn.Module):
            continue
        if not any(hasattr(module, a) for a in ("adapter_layer_names", "active_adapters", "active_adapter")):
            continue  # a module of the user's that happens to have a `base_layer` child: not an adapter wrapper
        names: Any = getattr(module, "active_adapters", None)
        if names is None:
            names = getattr(module, "active_adapter", ())
        if isinstance(names, str):
            names = [names]
        try:
            wrappers[path] = ",".join(str(n) for n in names)
        except TypeError:  # not a list of names: a wrapper all the same
            wrappers[path] = ""
    return wrappers


def peft_models(model: nn.Module) -> list[str]:
    """Paths of the peft models in ``model`` (``""``: ``model`` itself): a ``peft_config`` over ``base_model.model``.

    Their ``base_model.model.`` segments are what peft adds to every name of the model it wraps.
    """
    found = []
    for path, module in model.named_modules():
        inner = getattr(module, "base_model", None)
        if hasattr(module, "peft_config") and isinstance(getattr(inner, "model", None), nn.Module):
            found.append(path)
    return found


def base_path(path: str, wrappers: Mapping[str, str], peft: Sequence[str] = ()) -> str:
    """``path`` as it is without adapters: each wrapper's ``.base_layer`` removed, and the ``base_model.model.``
    that each peft model (``peft``: their paths) inserts.

    Example:
        >>> base_path("base_model.model.layers.0.q_proj.base_layer", {"base_model.model.layers.0.q_proj": "default"},
        ...           [""])
        'layers.0.q_proj'
    """
    parts = path.split(".")
    kept: list[str] = []
    for part in parts:
        if part == _BASE and ".".join(kept) in wrappers:
            continue
        kept.append(part)
    path = ".".join(kept)
    for outer in sorted(peft, key=len, reverse=True):
        head = f"{outer}.base_model.model." if outer else "base_model.model."
        if path.startswith(head):
            path = (f"{outer}." if outer else "") + path[len(head) :]
    return path


def _under_adapter(path: str, wrappers: dict[str, str]) -> bool:
    """Whether ``path`` is inside a wrapper but not in its base layer: an adapter's own matrix."""
    parts = path.split(".")
    return any(".".join(parts[:i]) in wrappers and parts[i] != _BASE for i in range(len(parts)))


@dataclass
class Selection:
    """The outcome of :func:`select_parameters`.

    Attributes:
        watched: the parameters to measure, in ``model.named_modules()`` order.
        frozen: names that passed every filter but have ``requires_grad=False`` (skipped).
        excluded: names that passed every filter but have no matrix form for
            :func:`~gradspectra.functional.as_matrix` (embeddings without ``include_embeddings``,
            1-D weights of a ``module_types`` entry such as ``nn.LayerNorm``).
        criteria: the non-default arguments the selection was made with, for messages.
    """

    watched: list[WatchedParameter]
    frozen: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    criteria: str = ""

    def describe_empty(self, model: nn.Module, limit: int = 8) -> str:
        """A message for an empty selection: what was asked, what was skipped and which names exist.

        Example:
            >>> model = nn.Sequential(nn.Linear(2, 2))
            >>> print(select_parameters(model, include="*.q_proj.weight").describe_empty(model))
            No parameter of Sequential was selected (include=['*.q_proj.weight']). The model has 2 parameters, e.g. '0.weight', '0.bias'.
        """  # noqa: E501
        names = [n for n, _ in model.named_parameters()]
        criteria = f" ({self.criteria})" if self.criteria else ""
        parts = [f"No parameter of {type(model).__name__} was selected{criteria}."]
        if self.frozen:
            parts.append(
                f"{len(self.frozen)} matched but are frozen (requires_grad=False), e.g. {_few(self.frozen, limit)}."
            )
        if self.excluded:
            parts.append(
                f"{len(self.excluded)} matched but have no matrix form (embeddings need include_embeddings=True), "
                f"e.g. {_few(self.excluded, limit)}."
            )
        if names:
            parts.append(f"The model has {len(names)} parameters, e.g. {_few(names, limit)}.")
        else:
            parts.append("The model has no parameters.")
        if not any(isinstance(m, DEFAULT_MODULE_TYPES) or is_conv1d(m) for m in model.modules()):
            # only a module's own `weight` is a candidate, and only a matrix-shaped one can be measured
            holders = {type(m).__name__ for m in model.modules() if (w := _weight(m)) is not None and w.ndim >= 2}
            if holders:
                parts.append(
                    f"Its matrix weights sit in {', '.join(sorted(holders))}: pass `module_types` to watch those."
                )
        return " ".join(parts)


def _weight(module: nn.Module) -> nn.Parameter | None:
    return dict(module.named_parameters(recurse=False)).get("weight")


def _few(names: Sequence[str], limit: int) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def _patterns(value: str | Sequence[str] | None, arg: str, allow_empty: bool) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"`{arg}` must be a glob string or a sequence of glob strings, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"`{arg}` must hold at least one glob (use None for no filter), got {value!r}")
    return tuple(value)


def _module_types(value: type[nn.Module] | Sequence[type[nn.Module]] | None) -> tuple[type[nn.Module], ...] | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, type) else value
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise TypeError(f"`module_types` must be a sequence of nn.Module subclasses, got {value!r}")
    for t in items:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"`module_types` must be a sequence of nn.Module subclasses, got {value!r}")
    if not items:
        raise ValueError(f"`module_types` must hold at least one type (use None for the defaults), got {value!r}")
    return tuple(items)


def _checked(
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    regex: str | re.Pattern[str] | None,
    module_types: type[nn.Module] | Sequence[type[nn.Module]] | None,
    predicate: Predicate | None,
    include_embeddings: bool,
    gradients: str = "auto",
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None, re.Pattern[str] | None, tuple[type[nn.Module], ...] | None]:
    """The selection arguments checked, with the globs, the regex and the types in their normal form."""
    if gradients not in GRADIENTS:
        raise ValueError(f"`gradients` can be {', '.join(GRADIENTS)}, got {gradients!r}")
    includes = _patterns(include, "include", allow_empty=False)
    excludes = _patterns(exclude, "exclude", allow_empty=True)
    if regex is not None and not isinstance(regex, (str, re.Pattern)):
        raise TypeError(f"`regex` must be a str or a compiled re.Pattern, got {regex!r}")
    try:
        pattern = re.compile(regex) if isinstance(regex, str) else regex
    except re.error as err:
        raise ValueError(f"`regex` does not compile ({err}), got {regex!r}") from err
    types = _module_types(module_types)
    if predicate is not None and not callable(predicate):
        raise TypeError(f"`predicate` must be a callable (name, param, module) -> bool, got {predicate!r}")
    if not isinstance(include_embeddings, bool):
        raise TypeError(f"`include_embeddings` must be a bool, got {include_embeddings!r}")
    return includes, excludes, pattern, types


def check_selection_args(
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    regex: str | re.Pattern[str] | None = None,
    module_types: type[nn.Module] | Sequence[type[nn.Module]] | None = None,
    predicate: Predicate | None = None,
    include_embeddings: bool = False,
    gradients: Gradients = "auto",
) -> None:
    """Check the arguments of :func:`select_parameters` without a model, so that a bad one fails early.

    The monitor's options (:class:`gradspectra.monitoring.MonitorConfig`) call it when they are built,
    so ``GradientSpectrumMonitor(include=[])`` fails at construction rather than at ``fit()``; the
    errors are the ones :func:`select_parameters` raises.

    Raises:
        TypeError: an argument of the wrong type (the message names it and shows what was received).
        ValueError: an empty ``include`` or ``module_types``, or a ``regex`` that does not compile.

    Example:
        >>> check_selection_args(include="*.q_proj.weight", module_types=[nn.Linear])
        >>> check_selection_args(module_types=["Linear"])
        Traceback (most recent call last):
        ...
        TypeError: `module_types` must be a sequence of nn.Module subclasses, got ['Linear']
    """
    _checked(include, exclude, regex, module_types, predicate, include_embeddings, gradients)


def select_parameters(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    regex: str | re.Pattern[str] | None = None,
    module_types: type[nn.Module] | Sequence[type[nn.Module]] | None = None,
    predicate: Predicate | None = None,
    include_embeddings: bool = False,
    gradients: Gradients = "auto",
) -> Selection:
    """Choose the weights whose gradient spectra are measured.

    Candidates are the ``weight`` parameters of modules of ``module_types`` (default
    :data:`DEFAULT_MODULE_TYPES` plus GPT-2 ``Conv1D``; an ``nn.Linear`` entry also matches ``Conv1D``,
    which is a linear layer stored transposed) and of ``nn.Embedding`` / ``nn.EmbeddingBag``
    (by default, or with ``include_embeddings``). A candidate is watched when it passes every filter
    given (they combine with AND), requires grad, and has a matrix form:

    - ``include``: ``fnmatch`` globs (case-sensitive) on the full parameter name, any may match:
      ``"*.self_attn.*_proj.weight"``;
    - ``exclude``: globs; a name matching any is dropped;
    - ``regex``: ``re.search`` on the full parameter name;
    - ``predicate(name, param, module)``: called last, for each candidate left;
    - ``include_embeddings``: embeddings are measured only when ``True`` (their gradient touches only
      the rows of the tokens seen); otherwise they land in :attr:`Selection.excluded`.

    Frozen weights and adapters (``gradients``, :data:`Gradients`): a module that wraps a base layer with
    adapters (peft's LoRA, DoRA, IA3 layers; :func:`adapter_wrappers`) is one layer, named and matched
    as its base: without the ``.base_layer`` segment and without the ``base_model.model.`` a peft model
    puts before every name (:func:`base_path`), so names and keys are those of the model without
    adapters and ``"*.self_attn.*_proj.weight"`` matches ``...q_proj.base_layer.weight`` (the filters
    also see the real name). Under ``"auto"`` (default) and ``"implied"`` the adapters' own matrices are
    not candidates, and a frozen ``nn.Linear`` weight is watched by its implied gradient (``implied=True``, with
    ``adapter`` named) when it is wrapped or an explicit filter (``include``, ``regex``, ``predicate``)
    matched it (``"auto"``), or whenever it matched (``"implied"``). Under ``"parameters"`` frozen
    weights are skipped and each adapter matrix is a layer of its own (a base weight made trainable
    keeps its base name). A frozen weight shared by several modules (tied) is not measured by its implied
    gradient (it lands in :attr:`Selection.frozen`).

    A parameter shared by several modules (tied weights) is watched once, under the module that
    measures it best: a non-embedding module first (GPT-2's tied ``wte`` / ``lm_head`` weight is watched
    as ``lm_head.weight``), else the first in ``named_modules()`` order. ``(index, component)`` come
    from :func:`~gradspectra.capture.parse_layer_names` over all the model's parameter names, given the
    model: a numeric segment is a layer index only where it numbers repeated blocks (same class, same
    shapes), so the differently shaped layers of a ``Sequential`` head keep their own names.

    An empty selection is not an error here; :meth:`Selection.describe_empty` explains it. The
    arguments are checked by :func:`check_selection_args`, which can be called without a model.

    Raises:
        TypeError: an argument of the wrong type (the message names it and shows what was received).
        ValueError: an empty ``include`` or ``module_types``, or a ``regex`` that does not compile.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        >>> sel = select_parameters(model)
        >>> [w.name for w in sel.watched], sel.excluded
        (['1.weight', '3.weight'], ['0.weight'])
        >>> [w.name for w in select_parameters(model, exclude="3.*", include_embeddings=True).watched]
        ['0.weight', '1.weight']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {model!r}")
    includes, excludes, pattern, types = _checked(
        include, exclude, regex, module_types, predicate, include_embeddings, gradients
    )
    wrappers = adapter_wrappers(model)
    peft = peft_models(model) if wrappers else []
    skip_adapters = gradients != "parameters"
    adapters = {base_path(path, wrappers, peft): names for path, names in wrappers.items()}
    explicit = includes is not None or pattern is not None or predicate is not None

    def is_candidate(module: nn.Module) -> bool:
        if types is None:
            return isinstance(module, (*DEFAULT_MODULE_TYPES, *_EMBEDDING_TYPES)) or is_conv1d(module)
        if isinstance(module, types):
            return True
        if include_embeddings and isinstance(module, _EMBEDDING_TYPES):
            return True
        return issubclass(nn.Linear, types) and is_conv1d(module)

    def passes(name: str, real: str, param: nn.Parameter, module: nn.Module) -> bool:
        names = (name,) if real == name else (name, real)
        if includes is not None and not any(fnmatch.fnmatchcase(n, p) for n in names for p in includes):
            return False
        if excludes and any(fnmatch.fnmatchcase(n, p) for n in names for p in excludes):
            return False
        if pattern is not None and all(pattern.search(n) is None for n in names):
            return False
        return predicate is None or bool(predicate(name, param, module))

    # every module through which a parameter passes the filters, grouped by parameter
    owners: dict[int, list[tuple[int, str, nn.Module, nn.Parameter]]] = {}
    for position, (path, module) in enumerate(model.named_modules()):
        if not is_candidate(module):
            continue
        param = _weight(module)
        if param is None or (skip_adapters and wrappers and _under_adapter(path, wrappers)):
            continue
        shown = base_path(path, wrappers, peft) if wrappers else path
        name = f"{shown}.weight" if shown else "weight"
        if passes(name, f"{path}.weight" if path else "weight", param, module):
            owners.setdefault(id(param), []).append((position, path, module, param))

    def rank(owner: tuple[int, str, nn.Module, nn.Parameter]) -> tuple[bool, bool, int]:
        position, _, module, param = owner
        measurable = as_matrix(param.detach(), module, include_embeddings=include_embeddings) is not None
        return (not measurable, isinstance(module, _EMBEDDING_TYPES), position)

    chosen = sorted((min(group, key=rank) for group in owners.values()), key=lambda owner: owner[0])
    # a weight held by several modules (tied) gets gradient from each: one module's hooks would see a part of it
    holders: dict[int, int] = {}
    for module in model.modules():
        weight = _weight(module)
        if weight is not None:
            holders[id(weight)] = holders.get(id(weight), 0) + 1
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    parsed = parse_layer_names(all_names + [f"{p}.weight" if p else "weight" for _, p, _, _ in chosen], model)

    criteria = _criteria(includes, excludes, pattern, types, predicate, include_embeddings, gradients)
    selection = Selection(watched=[], criteria=criteria)
    for _, real, module, param in chosen:
        index, component = parsed[f"{real}.weight" if real else "weight"]
        path = real
        if wrappers:
            # named as without adapters: the layer's own segments and peft's prefix go from the name and component
            path = base_path(real, wrappers, peft)
            component = path if component == real else ".".join(s for s in component.split(".") if s != _BASE)
        name = f"{path}.weight" if path else "weight"
        adapter = adapters.get(path)
        if not param.requires_grad:
            implied = gradients == "implied" or ((adapter is not None or explicit) and gradients == "auto")
            if implied and is_linear(module) and param.ndim == 2 and min(param.shape) >= 2 and holders[id(param)] == 1:
                watched = WatchedParameter(name, path, index, component, param, module, implied=True, adapter=adapter)
                selection.watched.append(watched)
            else:
                selection.frozen.append(name)
        elif as_matrix(param.detach(), module, include_embeddings=include_embeddings) is None:
            selection.excluded.append(name)
        else:
            selection.watched.append(WatchedParameter(name, path, index, component, param, module, adapter=adapter))
    indices = [w.index for w in selection.watched if w.index is not None]
    width = max([2] + [len(str(i)) for i in indices])
    if width > 2:
        # layer_100 must not sort before layer_11: pad every key to the widest index
        selection.watched = [replace(w, index_width=width) for w in selection.watched]
    return selection


def _criteria(
    includes: tuple[str, ...] | None,
    excludes: tuple[str, ...] | None,
    pattern: re.Pattern[str] | None,
    types: tuple[type[nn.Module], ...] | None,
    predicate: Predicate | None,
    include_embeddings: bool,
    gradients: str = "auto",
) -> str:
    parts = []
    for arg, globs in (("include", includes), ("exclude", excludes)):
        if globs is not None:
            parts.append(f"{arg}={list(globs)!r}")
    if pattern is not None:
        parts.append(f"regex={pattern.pattern!r}")
    if types is not None:
        parts.append(f"module_types=[{', '.join(t.__name__ for t in types)}]")
    if predicate is not None:
        parts.append(f"predicate={getattr(predicate, '__name__', repr(predicate))}")
    if include_embeddings:
        parts.append("include_embeddings=True")
    if gradients != "auto":
        parts.append(f"gradients={gradients!r}")
    return ", ".join(parts)
