"""Bandwidth-aware encoding: the lightest-loss compression whose update still crosses the device's uplink
within ``upload_budget`` seconds. A device whose uplink is not known keeps its own setting.

    bytes(form) = model_bytes × ratio(form);  choose the first form, in the order below, with
    bytes(form) / uplink <= upload_budget, else the last one.

The ratios are those of compression.py's wire forms on a float32 model (int8: one byte per entry plus a
float32 scale per 512; top-k: an int32 index and a float32 value per kept entry).

>>> from fedmqtt.allocation.base import AgentView, PolicyConfig
>>> from fedmqtt.allocation.uniform import placement
>>> from fedmqtt.capabilities import Capabilities, Link
>>> cfg = PolicyConfig({"d": "digits"}, model_bytes={"d": 1_000_000}, upload_budget=1.0)
>>> def dev(uplink):
...     return AgentView(Capabilities(link=Link(uplink), tasks=("digits",)))
>>> agents = {"lan": dev(5e6), "dsl": dev(6e5), "lte": dev(3e5), "nb": dev(2e4), "new": dev(None)}
>>> plans = bandwidth().refine(placement().refine({}, agents, 0.0, cfg), agents, 0.0, cfg)
>>> {a: p.compression for a, p in sorted(plans.items())}
{'dsl': 'float16', 'lan': 'none', 'lte': 'int8', 'nb': 'topk:0.01', 'new': None}
"""

from __future__ import annotations

from dataclasses import replace

from fedmqtt.allocation.base import Agents, Part, Plans, PolicyConfig

#: (form, bytes sent / bytes of a float32 update), lightest loss first.
FORMS: tuple[tuple[str, float], ...] = (("none", 1.0), ("float16", 0.5), ("int8", 0.25 + 1 / 512),
                                        ("topk:0.1", 0.2), ("topk:0.01", 0.02))
_RATIO = dict(FORMS)


def size_ratio(form: str | None) -> float:
    """Bytes an update takes in ``form`` relative to float32 (unknown or the agent's own: 1)."""
    if form is None:
        return 1.0
    if form.startswith("topk:"):
        try:
            text = form[5:]
            return 2 * (float(text[:-1]) / 100 if text.endswith("%") else float(text))
        except ValueError:
            return 1.0
    return _RATIO.get(form, 1.0)


def choose(model_bytes: int, uplink: float, budget: float) -> str:
    """The first form of :data:`FORMS` whose update crosses ``uplink`` (bytes/s) within ``budget`` s."""
    for form, ratio in FORMS:
        if model_bytes * ratio / uplink <= budget:
            return form
    return FORMS[-1][0]


def _refine(plans: Plans, agents: Agents, now: float, config: PolicyConfig) -> Plans:
    del now
    out = dict(plans)
    for a, plan in plans.items():
        uplink = agents[a].capabilities.link.uplink
        if uplink:
            size = config.model_bytes.get(plan.federation, config.default_model_bytes)
            out[a] = replace(plan, compression=choose(size, uplink, config.upload_budget))
    return out


def bandwidth() -> Part:
    return Part("bandwidth", _refine)
