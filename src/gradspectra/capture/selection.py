"""Which weights of a model are watched: module types, name globs, a regex and a predicate."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from torch import nn

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
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None, re.Pattern[str] | None, tuple[type[nn.Module], ...] | None]:
    """The selection arguments checked, with the globs, the regex and the types in their normal form."""
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
    _checked(include, exclude, regex, module_types, predicate, include_embeddings)


def select_parameters(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    regex: str | re.Pattern[str] | None = None,
    module_types: type[nn.Module] | Sequence[type[nn.Module]] | None = None,
    predicate: Predicate | None = None,
    include_embeddings: bool = False,
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
    includes, excludes, pattern, types = _checked(include, exclude, regex, module_types, predicate, include_embeddings)

    def is_candidate(module: nn.Module) -> bool:
        if types is None:
            return isinstance(module, (*DEFAULT_MODULE_TYPES, *_EMBEDDING_TYPES)) or is_conv1d(module)
        if isinstance(module, types):
            return True
        if include_embeddings and isinstance(module, _EMBEDDING_TYPES):
            return True
        return issubclass(nn.Linear, types) and is_conv1d(module)

    def passes(name: str, param: nn.Parameter, module: nn.Module) -> bool:
        if includes is not None and not any(fnmatch.fnmatchcase(name, p) for p in includes):
            return False
        if excludes and any(fnmatch.fnmatchcase(name, p) for p in excludes):
            return False
        if pattern is not None and pattern.search(name) is None:
            return False
        return predicate is None or bool(predicate(name, param, module))

    # every module through which a parameter passes the filters, grouped by parameter
    owners: dict[int, list[tuple[int, str, nn.Module, nn.Parameter]]] = {}
    for position, (path, module) in enumerate(model.named_modules()):
        if not is_candidate(module):
            continue
        param = _weight(module)
        if param is None:
            continue
        name = f"{path}.weight" if path else "weight"
        if passes(name, param, module):
            owners.setdefault(id(param), []).append((position, path, module, param))

    def rank(owner: tuple[int, str, nn.Module, nn.Parameter]) -> tuple[bool, bool, int]:
        position, _, module, param = owner
        measurable = as_matrix(param.detach(), module, include_embeddings=include_embeddings) is not None
        return (not measurable, isinstance(module, _EMBEDDING_TYPES), position)

    chosen = sorted((min(group, key=rank) for group in owners.values()), key=lambda owner: owner[0])
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    parsed = parse_layer_names(all_names + [f"{p}.weight" if p else "weight" for _, p, _, _ in chosen], model)

    criteria = _criteria(includes, excludes, pattern, types, predicate, include_embeddings)
    selection = Selection(watched=[], criteria=criteria)
    for _, path, module, param in chosen:
        name = f"{path}.weight" if path else "weight"
        if not param.requires_grad:
            selection.frozen.append(name)
        elif as_matrix(param.detach(), module, include_embeddings=include_embeddings) is None:
            selection.excluded.append(name)
        else:
            index, component = parsed[name]
            selection.watched.append(WatchedParameter(name, path, index, component, param, module))
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
    return ", ".join(parts)
