"""Which samples of a batch stand out: a score per sample from its per-layer gradient metrics, against the
rest of the batch and a running baseline of earlier samples, with reasons a person can act on.

Pure numpy. The terms (:data:`SAMPLE_TERMS`), each a robust z-score (median and median absolute deviation,
on a log scale) against the batch: the whole gradient's norm (root of the sum of squares over layers),
upwards; the effective rank, downwards, as the median over layers of per-layer z-scores, so that one wild
layer does not make a sample and a change in most layers does; and the closeness of a sample to its most
similar one, from the cosines of the samples' gradients and the token-wise similarity of their inputs
(a sample repeated in the batch). Against the recent samples of earlier steps (those not scored as
outliers) the norm and the effective rank count only over the threshold: a batch bad as a whole. Where the
caller gives each sample's output gradient at the model's output (how hard the loss pulls on it: a classifier
head's ``p - y``), that is a term of its own, upwards, against the batch and recent samples, and replaces the
whole gradient's norm, which is that pull times what the layers below make of it (the input's length and
wording, not its quality). The score is the largest term; a non-finite gradient scores ``inf``.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: per-sample metrics scored, on a log scale, and the direction that makes a sample suspect: a gradient
#: much larger than the others' (a wrong label, noise text: the loss pulls hard), or one spread over far
#: fewer directions (a text cut short, one template). The other direction is a sample the model already
#: fits, not a bad one; and terms that are mostly noise per sample (top_sv_ratio, stable_rank) would
#: outrank a clear outlier in the largest-term rule, so they are measured but not scored.
SAMPLE_TERMS: dict[str, int] = {"frobenius_norm": 1, "effective_rank": -1}
#: per-sample metrics every measurement includes (the scored ones and the papers' top share)
SAMPLE_METRICS: tuple[str, ...] = ("nuclear_norm", "frobenius_norm", "effective_rank", "top_sv_ratio")
_MAD_TO_SIGMA = 1.4826
_LOG_FLOOR = 0.1  # smallest spread on the log scale (10 %): a batch of near-equal values is not a razor's edge
_CLOSENESS_FLOOR = 0.25  # smallest spread of -log(1 - largest cosine) over the batch
_IDENTICAL = 1e-6  # 1 - cosine below this counts as identical (rounding)
_SIMILARITY_FLOOR = 0.1  # smallest spread of the samples' best token-wise input similarity
_MAX_LAYER_SETS = 64  # baselines of the whole gradient's norm kept (one per set of layers measured)
_SIMILAR = 0.5  # a cosine (batch mean removed) below this is not called similar, whatever the batch
_READABLE = {"frobenius_norm": "gradient norm", "effective_rank": "effective rank"}
_PULL = "output_gradient"  # the running baselines of the samples' output-gradient norms, one per layer read at


def _layer_set(layers: Sequence[str]) -> str:
    """A key for a set of layers (the running baseline of the whole gradient's norm is per set)."""
    return ",".join(sorted(layers))


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}")
    return float(value)


def _robust(x: np.ndarray, floor: float, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Median and spread (MAD as a standard deviation, at least ``floor``) along ``axis``, ignoring NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row gives NaN, handled by the callers
        med = np.nanmedian(x, axis=axis)
        mad = _MAD_TO_SIGMA * np.nanmedian(np.abs(x - np.expand_dims(med, axis)), axis=axis)
    return med, np.maximum(np.nan_to_num(mad, nan=floor), floor)


def _sample_list(indices: Sequence[int]) -> str:
    names = [str(i) for i in indices]
    if len(names) <= 1:
        return f"sample {names[0]}" if names else ""
    shown = names[:4] + ([f"{len(names) - 4} more"] if len(names) > 4 else [])
    return "samples " + ", ".join(shown[:-1]) + " and " + shown[-1]


class SampleScorer:
    """Scores the samples of each measured batch from their per-layer gradient metrics.

    Args:
        threshold: a term at or above this (in robust standard deviations) is an outlier and gets a reason.
        duplicate_cosine: a cosine similarity of two samples' gradients (the batch's mean gradient removed) at
            or above this, with the sample's largest cosine an outlier in the batch, is reported as "almost
            identical" (from 0.5, "very similar": a repeated sample under dropout).
        history: per-sample values kept per layer and metric for the running baseline.
        min_history: values needed before the running baseline is used.

    Example:
        >>> scorer = SampleScorer()
        >>> rng = np.random.default_rng(0)
        >>> norms = {f"l{k}": rng.lognormal(0, 0.1, 8) for k in range(4)}
        >>> for values in norms.values():
        ...     values[5] *= 6.0   # sample 5: six times the gradient norm of the others in every layer
        >>> metrics = {layer: {"frobenius_norm": v} for layer, v in norms.items()}
        >>> out = scorer.score(metrics)
        >>> max(out, key=lambda e: e["score"])["index"], out[5]["reasons"][0].split(" (")[0]
        (5, 'gradient norm 6.3x the batch median')
    """

    def __init__(
        self, threshold: float = 3.5, duplicate_cosine: float = 0.9, history: int = 512, min_history: int = 64
    ) -> None:
        self.threshold = _positive_number("threshold", threshold)
        if (
            isinstance(duplicate_cosine, bool)
            or not isinstance(duplicate_cosine, int | float)
            or not 0 < duplicate_cosine <= 1
        ):
            raise ValueError(f"`duplicate_cosine` must be in (0, 1], got {duplicate_cosine!r}")
        self.duplicate_cosine = float(duplicate_cosine)
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"`history` must be a positive int, got {history!r}")
        if isinstance(min_history, bool) or not isinstance(min_history, int) or not 1 <= min_history <= history:
            raise ValueError(f"`min_history` must be an int in [1, history={history}], got {min_history!r}")
        self.history, self.min_history = history, min_history
        self._seen: dict[tuple[str, str], deque[float]] = {}

    def score(
        self,
        metrics: Mapping[str, Mapping[str, Sequence[float] | np.ndarray]],
        cosines: np.ndarray | None = None,
        ids: Sequence[Any] | None = None,
        tokens: Sequence[int] | None = None,
        input_similarity: np.ndarray | None = None,
        output_gradient: Sequence[float] | np.ndarray | None = None,
        output_layer: str | None = None,
    ) -> list[dict[str, Any]]:
        """One entry per sample: ``{"index", "id", "score", "reasons", "metrics"}``.

        Args:
            metrics: ``{layer: {metric: values (B,)}}``, the samples' per-layer gradient metrics.
            cosines: ``(B, B)`` cosine similarities of the samples' gradients, or ``None``.
            input_similarity: ``(B, B)`` token-by-token similarity of the samples' inputs to the first
                watched layer (:func:`gradspectra.functional.per_sample_token_similarity`), or ``None``: a
                repeated sample under dropout has a gradient no closer to its twin's than to others'.
            ids: the samples' ids (``None`` entries where unknown).
            tokens: tokens that carried gradient per sample (reported, not scored).
            output_gradient: ``(B,)`` sizes of the samples' output gradients at the model's output (the hooked
                layer closest to the loss), or ``None``: how hard the loss pulls on each sample (a cross-entropy
                head's ``|p - y|``, in the order of the per-sample loss for two classes and roughly beyond), scored
                upwards against the batch and, over the threshold, recent samples. With it, the whole gradient's
                norm is not scored.
            output_layer: the name of the layer ``output_gradient`` was read at (for the reasons).

        Returns:
            entries in batch order; ``metrics`` of each is the mean over layers of every metric given
            (``nan`` where a layer's value was not finite), plus ``"layers"``, the layers measured.
        """
        layers = list(metrics)
        if not layers:
            return []
        names = list(next(iter(metrics.values())))
        b = len(np.asarray(next(iter(metrics[layers[0]].values()))))
        table: dict[str, np.ndarray] = {}
        for name in names:
            rows = [np.asarray(metrics[layer].get(name, ()), dtype=np.float64) for layer in layers]
            shapes = sorted({r.shape for r in rows})
            if shapes != [(b,)]:
                raise ValueError(f"`metrics` must give {b} values of {name!r} in every layer, got shapes {shapes}")
            table[name] = np.array(rows)
        nonfinite = np.zeros((len(layers), b), dtype=bool)
        for values in table.values():
            nonfinite |= ~np.isfinite(values)
        bad_layers = nonfinite.sum(0)
        zero = (table["frobenius_norm"] == 0).all(0) if "frobenius_norm" in table else np.zeros(b, dtype=bool)

        scores = np.zeros(b)
        reasons: list[list[tuple[float, str]]] = [[] for _ in range(b)]
        pull: np.ndarray | None = None
        if output_gradient is not None:
            pull = np.asarray(output_gradient, dtype=np.float64)
            if pull.shape != (b,):
                raise ValueError(f"`output_gradient` must give {b} values, got shape {pull.shape}")
        for name, sign in SAMPLE_TERMS.items():
            if name == "frobenius_norm" and pull is not None:
                # the whole gradient is the loss's pull times what the layers below make of it: with the pull
                # scored itself, the rest is the input's length and wording (a short clean text's gradient is
                # 10-15x the batch median at an ordinary loss), not its quality
                continue
            if name in table:
                self._metric_terms(name, sign, table[name], layers, nonfinite | zero[None, :], scores, reasons)
        skip = zero | (bad_layers > 0)
        if pull is not None:
            self._pull_term(pull, skip, scores, reasons, output_layer)
        for kind, sim in (("gradient", cosines), ("input", input_similarity)):
            if sim is not None:
                self._duplicate_terms(kind, np.asarray(sim, dtype=np.float64), skip, scores, reasons)
        for i in np.flatnonzero(bad_layers).tolist():
            scores[i] = np.inf
            reasons[i].insert(0, (np.inf, f"non-finite gradient in {bad_layers[i]}/{len(layers)} layers"))
        for i in np.flatnonzero(zero & (bad_layers == 0)).tolist():
            reasons[i].insert(0, (0.0, "no gradient: the sample's loss does not reach these layers (zero)"))
        self._remember(table, layers, scores, nonfinite | zero[None, :])
        if pull is not None:
            self._remember_pull(pull, scores, skip, output_layer)

        out: list[dict[str, Any]] = []
        for i in range(int(b)):
            with np.errstate(invalid="ignore"):
                summary = {
                    name: float(np.mean(v[:, i])) if np.isfinite(v[:, i]).all() else float("nan")
                    for name, v in table.items()
                }
            summary["layers"] = float(len(layers))
            if pull is not None:
                summary["output_gradient"] = float(pull[i])
            entry: dict[str, Any] = {
                "index": i,
                "id": None if ids is None or i >= len(ids) else ids[i],
                "score": float(scores[i]),
                "reasons": [text for _, text in sorted(reasons[i], key=lambda r: -r[0])],
                "metrics": summary,
            }
            if tokens is not None:
                entry["tokens"] = int(tokens[i])
            out.append(entry)
        return out

    def _metric_terms(
        self,
        name: str,
        sign: int,
        values: np.ndarray,
        layers: list[str],
        skip: np.ndarray,
        scores: np.ndarray,
        reasons: list[list[tuple[float, str]]],
    ) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.where(skip | ~(values > 0), np.nan, np.log(np.where(values > 0, values, 1.0)))
        if np.isnan(logs).all():
            return
        med, spread = _robust(logs, _LOG_FLOOR, axis=1)  # per layer, across the batch
        z = (logs - med[:, None]) / spread[:, None]
        readable = _READABLE.get(name, name)
        if name == "frobenius_norm":
            # the sample's whole gradient: sqrt of the sum of squares over layers (what a per-sample gradient
            # norm sees: a few large layers carry it), not a median over layers that a bimodal batch blurs
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                total = 0.5 * np.log(np.nansum(np.exp(2 * logs), axis=0))
            total = np.where(np.isnan(logs).all(0), np.nan, total)
            self._total_term(readable, total, z, layers, scores, reasons)
            return
        terms = [(z, med, "the batch median")]
        baseline = self._baseline(name, layers)
        if baseline is not None:
            base_med, base_spread = baseline
            terms.append(((logs - base_med[:, None]) / base_spread[:, None], base_med, "recent samples"))
        for zz, centre, against in terms:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a sample with no finite layer: its term is NaN
                term = np.nanmedian(zz, axis=0)
            term = sign * np.nan_to_num(term, nan=0.0)  # only the suspect direction counts
            if against != "the batch median":
                # against earlier samples only when over the threshold (a batch bad as a whole): below it, the
                # model's drift since then would reorder the batch's samples by noise
                term = np.where(term >= self.threshold, term, 0.0)
            for i in np.flatnonzero(term > scores):
                scores[i] = term[i]
            for i in np.flatnonzero(term >= self.threshold):
                signed = zz[:, i] * sign
                count = int(np.sum(signed >= self.threshold))
                measured = int(np.sum(~np.isnan(zz[:, i])))
                ratio = float(np.exp(np.nanmedian(logs[:, i] - centre)))
                reasons[i].append(
                    (
                        float(term[i]),
                        f"{readable} {ratio:.2g}x {against} in {count}/{measured} layers (z={sign * term[i]:.1f})",
                    )
                )

    def _total_term(
        self,
        readable: str,
        total: np.ndarray,
        layer_z: np.ndarray,
        layers: list[str],
        scores: np.ndarray,
        reasons: list[list[tuple[float, str]]],
    ) -> None:
        """The whole gradient's norm, upwards, against the batch and (over the threshold only) recent samples."""

        def describe(i: int, ratio: float, against: str, z: float) -> str:
            count = int(np.sum(layer_z[:, i] >= self.threshold))
            measured = int(np.sum(~np.isnan(layer_z[:, i])))
            return (
                f"{readable} {ratio:.2g}x {against} (z={z:.1f}; {count}/{measured} layers "
                f"at z >= {self.threshold:g} against the batch)"
            )

        key = ("total_norm", _layer_set(layers))
        self._upward_terms(total, ~np.isnan(total), key, scores, reasons, describe)

    def _pull_term(
        self,
        pull: np.ndarray,
        skip: np.ndarray,
        scores: np.ndarray,
        reasons: list[list[tuple[float, str]]],
        layer: str | None,
    ) -> None:
        """The output gradient's norm, upwards (log scale), against the batch and (over the threshold only) recent
        samples: the samples the loss pulls on hardest (a wrong label, a text the model cannot read), before the
        layers below mix the pull with the inputs' sizes."""
        usable = ~skip & np.isfinite(pull) & (pull > 0)
        at = f" at {layer}" if layer else ""

        def describe(i: int, ratio: float, against: str, z: float) -> str:
            return f"output gradient{at} {ratio:.2g}x {against}: the loss pulls hard on it (z={z:.1f})"

        logs = np.log(np.where(usable, pull, 1.0))
        self._upward_terms(logs, usable, (_PULL, layer or ""), scores, reasons, describe)

    def _upward_terms(
        self,
        logs: np.ndarray,
        usable: np.ndarray,
        key: tuple[str, str],
        scores: np.ndarray,
        reasons: list[list[tuple[float, str]]],
        describe: Callable[[int, float, str, float], str],
    ) -> None:
        """A log-scale value per sample, upwards, as a robust z against the batch and, counted only over the
        threshold, against the recent samples kept under ``key`` (a batch bad as a whole); ``describe(i, ratio,
        against, z)`` words a reason."""
        if usable.sum() < 3:
            return
        med, spread = _robust(logs[usable], _LOG_FLOOR)
        terms = [((logs - med) / spread, med, "the batch median")]
        row = self._seen.get(key)
        if row is not None and len(row) >= self.min_history:
            base_med, base_spread = _robust(np.fromiter(row, dtype=np.float64), _LOG_FLOOR)
            base = (logs - base_med) / base_spread
            terms.append((np.where(base >= self.threshold, base, 0.0), base_med, "recent samples"))
        for term, centre, against in terms:
            term = np.nan_to_num(np.where(usable, term, 0.0), nan=0.0)
            for i in np.flatnonzero(term > scores):
                scores[i] = term[i]
            for i in np.flatnonzero(term >= self.threshold):
                z = float(term[i])
                reasons[i].append((z, describe(int(i), float(np.exp(logs[i] - centre)), against, z)))

    def _remember_pull(self, pull: np.ndarray, scores: np.ndarray, skip: np.ndarray, layer: str | None) -> None:
        ok = (scores < self.threshold) & ~skip & np.isfinite(pull) & (pull > 0)
        self._seen.setdefault((_PULL, layer or ""), deque(maxlen=self.history)).extend(np.log(pull[ok]).tolist())

    def _duplicate_terms(
        self,
        kind: str,
        cos: np.ndarray,
        skip: np.ndarray,
        scores: np.ndarray,
        reasons: list[list[tuple[float, str]]],
    ) -> None:
        b = cos.shape[0]
        if b < 3 or cos.shape != (b, b):
            return
        others = np.where(np.eye(b, dtype=bool) | skip[None, :] | skip[:, None], -np.inf, cos)
        best = others.max(1)
        usable = np.isfinite(best)
        if usable.sum() < 3:
            return
        if kind == "gradient":
            # closeness to identical on a log scale: a twin's 1 - cosine is ~0 where others' are 0.1-1, and the
            # batch's typical closeness (all gradients alike early in training, say) is the reference
            value = -np.log(np.clip(1.0 - best, _IDENTICAL, 2.0))
            floor = _CLOSENESS_FLOOR
        else:
            # inputs: copies of a text under dropout stay at 0.6-0.8 where other texts' best match is 0.1-0.4
            value, floor = best, _SIMILARITY_FLOOR
        med, spread = _robust(value[usable], floor)
        z = np.where(usable, (value - med) / spread, 0.0)
        for i in np.flatnonzero(usable & (best >= _SIMILAR)):
            # below _SIMILAR nothing is called similar, so nothing is scored for it either
            if z[i] > scores[i]:
                scores[i] = z[i]
            if z[i] >= self.threshold:
                near = max(_SIMILAR, best[i] - 0.05)
                partners = [int(j) for j in np.flatnonzero(others[i] >= near)]
                how = "almost identical to" if best[i] >= self.duplicate_cosine else "very similar to"
                what = "cosine" if kind == "gradient" else "token-wise cosine"
                reasons[i].append(
                    (float(z[i]), f"{kind} {how} {_sample_list(partners)} ({what} {best[i]:.2f}, batch mean removed)")
                )

    def _baseline(self, name: str, layers: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        rows = [self._seen.get((name, layer)) for layer in layers]
        if any(r is None or len(r) < self.min_history for r in rows):
            return None
        stats = [_robust(np.fromiter(r, dtype=np.float64), _LOG_FLOOR) for r in rows if r is not None]
        return np.array([m for m, _ in stats]), np.array([s for _, s in stats])

    def _remember(self, table: dict[str, np.ndarray], layers: list[str], scores: np.ndarray, skip: np.ndarray) -> None:
        keep = scores < self.threshold
        if "frobenius_norm" in table:
            fro = np.where(skip, np.nan, table["frobenius_norm"])
            ok = keep & ~np.isnan(fro).all(0) & (np.nansum(fro, axis=0) > 0)
            total = np.sqrt(np.nansum(fro[:, ok] ** 2, axis=0))
            key = ("total_norm", _layer_set(layers))
            if key not in self._seen:
                # one baseline per set of layers measured (a rotation changes the set, and the total with it);
                # the oldest sets go first
                sets = [k for k in self._seen if k[0] == "total_norm"]
                for old in sets[: max(0, len(sets) - _MAX_LAYER_SETS + 1)]:
                    del self._seen[old]
            self._seen.setdefault(key, deque(maxlen=self.history)).extend(np.log(total).tolist())
        for name, values in table.items():
            if name not in SAMPLE_TERMS or name == "frobenius_norm":
                continue
            for k, layer in enumerate(layers):
                ok = keep & ~skip[k] & (values[k] > 0)
                row = self._seen.setdefault((name, layer), deque(maxlen=self.history))
                row.extend(np.log(values[k][ok]).tolist())

    def reset(self) -> None:
        """Forget the running baseline (the layers measured changed)."""
        self._seen.clear()

    def state_dict(self) -> dict[str, Any]:
        return {f"{name}|{layer}": list(row) for (name, layer), row in self._seen.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._seen = {}
        for key, values in state.items():
            name, _, layer = key.partition("|")
            self._seen[(name, layer)] = deque((float(v) for v in values), maxlen=self.history)
