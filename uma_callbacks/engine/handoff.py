"""What the metrics of one save hand each other: the order they run in, what each one gets, its cache identity.

A metric declares the outputs of other metrics it reads at the same save
(:meth:`~uma_callbacks.metrics.base.Metric.results_needed`, e.g. the sharpness metric's
``{"fisher": ("top_eigenvector",)}``). For each save the suite then

1. runs the metrics in :func:`run_order`: the configured order, except that a metric's
   providers run before it;
2. tells each provider which outputs later metrics ask of it (``ctx.results.requested``),
   so it forms them only then, and keeps what it hands on (``result.provided``) in memory
   until the last metric that asked for it has run (:class:`Handoff`);
3. gives each consumer the outputs that reached it and, for the others, why not
   (:class:`~uma_callbacks.metrics.base.SaveResults`): the provider is not in this save,
   failed, was skipped or timed out, or was read from the cache (what a metric hands on
   is never journalled). The consumer runs either way and says what it went without;
4. keys the consumer's cache by its providers' results (their cache keys, and which
   outputs reached it), so a result computed without the provider is never reused for
   one computed with it, nor the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from uma_callbacks.core.records import Record
from uma_callbacks.metrics.base import Metric, MetricResult, SaveResults

#: Why a provider read from the cache hands nothing on.
FROM_CACHE = (
    "{name} was read from the cache at this step, and what a metric hands on is kept in memory only "
    "(measure again with use_cache=False to compute both)"
)


def run_order(metrics: Sequence[Metric]) -> list[int]:
    """The indices of ``metrics`` in the order they run: as configured, each one's providers first.

    A provider not among ``metrics`` is ignored (its consumer runs without it).

    Raises:
        ValueError: metrics that need each other's results (a cycle), naming them.

    Example:
        >>> from uma_callbacks.metrics import DirectionalSharpness, FisherInformation, GradientFlow
        >>> ms = [DirectionalSharpness(directions=["fisher"]), GradientFlow(), FisherInformation()]
        >>> [ms[i].name for i in run_order(ms)]
        ['gradient_flow', 'fisher', 'sharpness']
    """
    names = [m.name for m in metrics]
    needs = [{p for p in m.results_needed() if p in names and p != m.name} for m in metrics]
    placed: list[int] = []
    done: set[str] = set()
    while len(placed) < len(metrics):
        ready = [i for i in range(len(metrics)) if i not in placed and needs[i] <= done]
        if not ready:
            stuck = [names[i] for i in range(len(metrics)) if i not in placed]
            raise ValueError(f"metrics {stuck} need each other's results at the same save (a cycle in results_needed)")
        placed.append(ready[0])
        done.add(names[ready[0]])
    return placed


def asked_outputs(metrics: Sequence[Metric]) -> dict[str, frozenset[str]]:
    """``{provider name: the outputs the other metrics of the save ask of it}`` (providers among ``metrics`` only)."""
    names = {m.name for m in metrics}
    asked: dict[str, set[str]] = {}
    for metric in metrics:
        for provider, outputs in metric.results_needed().items():
            if provider in names and provider != metric.name:
                asked.setdefault(provider, set()).update(outputs)
    return {name: frozenset(outputs) for name, outputs in asked.items()}


@dataclass
class Handoff:
    """One save's hand-offs between metrics; built by :meth:`for_save`, fed by the suite metric by metric.

    Attributes:
        asked: ``{provider name: outputs asked of it}`` (:func:`asked_outputs`).
        present: the names of the save's metrics.
        waiting: ``{provider name: consumers still to run}``: its outputs are dropped once none is left.
        outputs: ``{provider name: {output: value}}`` handed on so far.
        missing: ``{provider name or "<provider>/<output>": why it was not handed on}``.
        keys: ``{provider name: its record's cache key}`` ("" when not cacheable).
    """

    asked: dict[str, frozenset[str]]
    present: set[str]
    waiting: dict[str, int]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_save(cls, metrics: Sequence[Metric]) -> Handoff:
        """The hand-offs of a save of ``metrics`` (none handed yet)."""
        names = {m.name for m in metrics}
        waiting: dict[str, int] = {}
        for metric in metrics:
            for provider in metric.results_needed():
                if provider in names and provider != metric.name:
                    waiting[provider] = waiting.get(provider, 0) + 1
        return cls(asked=asked_outputs(metrics), present=names, waiting=waiting)

    def results_for(self, metric: Metric) -> SaveResults | None:
        """What ``metric`` gets (its providers' outputs, or why not) and what is asked of it; ``None``: neither."""
        needed = metric.results_needed()
        requested = self.asked.get(metric.name, frozenset())
        if not needed and not requested:
            return None
        outputs: dict[str, dict[str, Any]] = {}
        missing: dict[str, str] = {}
        for provider, wanted in needed.items():
            if provider not in self.present or provider == metric.name:
                missing[provider] = f"{provider} is not among this save's metrics (add it to get its {', '.join(wanted)})"
            elif provider in self.outputs:
                outputs[provider] = {o: v for o, v in self.outputs[provider].items() if o in wanted}
                for output in wanted:
                    reason = self.missing.get(f"{provider}/{output}")
                    if reason:
                        missing[f"{provider}/{output}"] = reason
            else:
                missing[provider] = self.missing.get(provider, f"{provider} did not run before this metric")
        return SaveResults(outputs=outputs, missing=missing, requested=requested)

    def identity(self, metric: Metric, results: SaveResults | None, *, as_if_handed: bool = False) -> str | None:
        """The part of ``metric``'s cache key that its providers' results make; ``None``: not cacheable.

        Each provider whose outputs reached the metric adds ``<name>=<its cache key>[<those
        outputs>]``; ``""`` when none did (or the metric reads no other metric), so a result
        computed without them keeps the key it had before metrics handed results on.
        ``as_if_handed``: the identity a result computed with every asked output has (a cached
        one of those is as good as computing now with them).
        """
        needed = metric.results_needed()
        parts = []
        for provider in sorted(needed):
            key = self.keys.get(provider, "")
            if as_if_handed:
                reached = sorted(needed[provider]) if key else []
            else:
                got = results.outputs.get(provider, {}) if results is not None else {}
                reached = sorted(got)
            if not reached:
                continue
            if not key:  # values from a provider that cannot be identified: the result cannot be either
                return None
            parts.append(f"{provider}={key}[{','.join(reached)}]")
        return "results=" + ";".join(parts) if parts else ""

    def handed(self, metric: Metric, result: MetricResult | None, record: Record) -> None:
        """Keep what ``metric`` hands on at this save (``result``: ``None`` for a cache hit), or why it hands nothing."""
        name = metric.name
        if name not in self.asked:
            return
        self.keys[name] = record.cache_key
        if record.status == "cached" or result is None:
            self.missing[name] = FROM_CACHE.format(name=name)
        elif not result.ok:
            message = (result.error or {}).get("message", "")
            self.missing[name] = f"{name} {result.status} at this save" + (f": {message[:300]}" if message else "")
        else:
            asked = self.asked[name]
            self.outputs[name] = {o: v for o, v in result.provided.items() if o in asked}
            reasons = result.meta.get("not_provided") or {}
            for output in sorted(asked - set(self.outputs[name])):
                why = reasons.get(output) if isinstance(reasons, dict) else None
                self.missing[f"{name}/{output}"] = str(why or f"{name} did not form its {output}")

    def consumed(self, metric: Metric) -> None:
        """``metric`` has run: drop the outputs no metric still to run asked for (they may be model-sized)."""
        for provider in metric.results_needed():
            if provider in self.waiting:
                self.waiting[provider] -= 1
                if self.waiting[provider] <= 0:
                    self.outputs.pop(provider, None)
