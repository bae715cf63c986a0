"""Which bundle version answers a request: aliases resolved, traffic split, sticky arms.

`Arms` holds what each alias pointed at when last read (`resolve_arms`) and the split
weights. A request's arm comes from its request id: sha256(id) mapped to [0, 1) and
cut by the cumulative weights, so one id always lands on the same arm while the split
and aliases stay put, and a large number of ids fills the arms in proportion to the
weights. An alias the registry lacks (no canary yet) gets no traffic: its weight goes
to the others in proportion.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from engine.registry.errors import RegistryError
from engine.registry.schema import BUNDLE_FAMILY


@dataclass(frozen=True)
class Arms:
    """alias -> fixed bundle ref ("name/version"), and alias -> weight (resolved aliases only)."""

    refs: dict[str, str]
    weights: dict[str, float]

    def choose(self, request_id: str) -> tuple[str, str]:
        """(alias, bundle ref) for this request id; production when no arm has a weight."""
        live = [(a, w) for a, w in sorted(self.weights.items(), key=lambda kv: kv[0] != "production") if w > 0]
        if not live:
            return "production", self.refs["production"]
        total = sum(w for _, w in live)
        u = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2.0**64
        acc = 0.0
        for alias, w in live:
            acc += w / total
            if u < acc:
                return alias, self.refs[alias]
        alias = live[-1][0]
        return alias, self.refs[alias]


def resolve_arms(registry, bundle: str, split: dict[str, float]) -> Arms:
    """Read `bundle@alias` for production and every other alias of the split with a
    weight > 0.

    production must resolve (RegistryError otherwise), whatever its weight: it is what
    /healthz and /v1/models report, and what answers when no other arm can (a split of
    production 0, canary 1 before the canary alias is set). Other aliases are dropped
    when unset. An alias that resolves to a version that is no bundle (`bundle` names a
    member model, a detector say) is a RegistryError naming the ref and its family: the
    replicas could never load it and would be restarted for ever.
    """
    refs, weights = {}, {}
    for alias, w in split.items():
        if w <= 0 and alias != "production":
            continue
        ref = f"{bundle}@{alias}"
        try:
            version = registry.get(ref)
        except RegistryError:
            if alias == "production":
                raise
            continue
        if version.family != BUNDLE_FAMILY:
            raise RegistryError(f"{ref}: {version.ref} is a {version.family} model, not an ensemble bundle; serve "
                                f"a bundle's name (family 'bundle' in `grainflow registry list`)")
        refs[alias] = version.ref
        weights[alias] = float(w)
    return Arms(refs, weights)
