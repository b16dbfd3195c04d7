"""``fedmqtt aggregator``: the service for a built-in task, with its state, model file and exporter."""

from __future__ import annotations

from typing import Any

from fedmqtt import allocator, model_file
from fedmqtt.admission import AdmissionLimits
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.choices import parse_list
from fedmqtt.cli_run import err, log, run, serve
from fedmqtt.core import Limits, Timing
from fedmqtt.durability import default_directory
from fedmqtt.errors import ConfigError
from fedmqtt.privacy import CentralDP
from fedmqtt.strategies.registry import make
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, mqtt_connector


def status(agg: Aggregator) -> str:
    m = agg.metrics()
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(m.rejected_by_reason.items()))
    acc = f", accuracy {m.accuracy:.4f} (v{m.evaluated_version})" if m.accuracy is not None else ""
    return (f"version {m.version}, accepted {m.accepted}, rejected {m.rejected}"
            f"{f' ({reasons})' if reasons else ''}, {m.agents_online} agents online, "
            f"{m.updates_per_s:.1f} updates/s{acc}")


def run_aggregator(s: dict[str, Any]) -> None:
    allocator.tune()  # model-sized arrays are reused instead of faulted in again (fedmqtt.allocator)
    topics = Topics(s["prefix"], s["federation"])
    directory = None if s["ephemeral"] else (s["state_dir"] or str(default_directory(topics)))
    try:
        central = s["dp_clip"] is not None and not s["secure"]  # secure: the noise is the secure service's
        strategy = make(s["strategy"], alpha=s["alpha"], buffer_size=1 if s["secure"] else s["buffer_size"],
                        server_opt=s["server_opt"], server_lr=s["server_lr"], dp_clip=s["dp_clip"] if central else None,
                        dp_noise=s["dp_noise"] if central else None, seed=s["seed"] if central else None,
                        dp_adjacency=s["dp_adjacency"] if central else None,
                        dp_quantile=s["dp_quantile"] if central else None,
                        dp_sampling=s["dp_sampling"] if central else None,
                        dp_count_noise=s["buffer_size"] / 20 if central and s["dp_quantile"] else None,
                        trim=s["trim"], spread=s["spread"], staleness_a=0.0 if s["secure"] else None)
        secure_dp = CentralDP(s["dp_clip"], s["dp_noise"] or 0.0).check() if s["secure"] and s["dp_clip"] else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    task = get_task(s["task"], seed=s["seed"])
    trainer = task.trainer(s["seed"])
    initial = trainer.initial
    if s["init_model"] is not None:
        initial = model_file.load(s["init_model"], initial)
    limits = Limits(max_staleness=s["max_staleness"], max_update_norm=s["max_update_norm"],
                    one_update_per_step=s["one_update_per_step"], max_participations=s["dp_max_steps"],
                    admission=AdmissionLimits(exempt=frozenset(parse_list(s["sites"]))))
    cfg = AggregatorConfig(topics=topics, limits=limits,
                           timing=Timing(round_size=s["round_size"], round_deadline=s["round_deadline"],
                                         step_every=s["dp_step_seconds"]),
                           state_dir=directory, snapshot_every=s["snapshot_every"], keep_journal=s["keep_journal"],
                           signing_key=s["signing_key"], workers=s["workers"],
                           model_forms=tuple(f.strip() for f in s["model_forms"].split(",") if f.strip()))
    agg = Aggregator(mqtt_connector(BrokerConfig.from_url(s["broker"])), initial, strategy, cfg,
                     evaluate=task.evaluate_fn(trainer))
    replayed = agg.recover()
    err.print(f"aggregator: {strategy.name} on {task.name}, {s['broker']}, federation {topics.federation!r}")
    if strategy.name == "fedasync-guard":
        err.print("aggregator: warning: fedasync-guard stops taking steps in live federations (docs/security.md, "
                  "section 4); for hostile fleets use fedbuff-guard")
    if directory is None:
        err.print("aggregator: ephemeral (no state kept): starting at version 0")
    else:
        err.print(f"aggregator: state in {directory}; resumed at version {agg.version} "
                  f"({replayed} journal records replayed)")
    if s["init_model"] is not None and agg.version > 0:
        err.print(f"aggregator: --init-model ignored: the state already holds version {agg.version}")
    exporter = None
    if s["metrics_port"] is not None:
        from fedmqtt.prometheus import Exporter

        exporter = Exporter()
        port = exporter.start(s["metrics_port"], s["metrics_bind"])
        err.print(f"aggregator: Prometheus metrics on http://{s['metrics_bind']}:{port}/metrics")
    saved = -1  # the version in the --save-model file

    def tick() -> None:
        nonlocal saved
        if exporter is not None:
            exporter.update(agg.metrics(), agg.handling.snapshot())
        if s["save_model"] is not None and agg.committed_version != saved:
            c = agg.committed
            model_file.save(s["save_model"], c.params, c.version, c.epoch)
            saved = c.version
            log.debug("model version %d saved to %s", c.version, s["save_model"])

    companions = []
    if s["secure"]:
        from fedmqtt.secure import SecureAggregation, SecureConfig

        k = s["buffer_size"] or 10
        secure = SecureAggregation(mqtt_connector(BrokerConfig.from_url(s["broker"])), agg,
                                   SecureConfig(cohort_size=k, min_cohort=min(3, k), dp=secure_dp))
        agg.rules = agg.rules._replace(strategy=strategy._replace(report=lambda *_: secure.privacy()))
        companions.append(secure)
        err.print(f"aggregator: secure aggregation, cohorts of {k} (edge agents need --secure)"
                  f"{', central DP on each unmasked sum' if secure_dp else ''}")
    try:
        run(serve(agg, lambda: status(agg), s["status_every"], tick, companions))
    finally:
        if exporter is not None:
            exporter.stop()
    if s["save_model"] is not None:
        err.print(f"aggregator: model version {saved} saved to {s['save_model']}")
