"""The command line as a user meets it: every mistake is one line and a non-zero exit, the results can be
taken away (model file, recorded run, report, Prometheus), and the deployment files work with what
``fedmqtt broker init`` writes. Each test runs the real ``fedmqtt`` in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fedmqtt.broker import MosquittoProcess, free_port
from fedmqtt.security import init_broker
from fedmqtt.transport import BrokerConfig

REPO = Path(__file__).resolve().parents[1]
FEDMQTT = [sys.executable, "-m", "fedmqtt"]


def fedmqtt(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDMQTT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_one_error_line(done: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("fedmqtt demo:")]
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize(("args", "words"), [
    (["demo", "--strategy", "fedbuf"], ["unknown strategy 'fedbuf'", "did you mean fedbuff"]),
    (["demo", "--partition", "nope"], ["unknown partition 'nope'", "iid, dirichlet"]),
    (["demo", "--agents", "0"], ["--agents"]),
    (["demo", "--alpha", "0.5"], ["No such option: --alpha"]),
    (["demo", "--broker", "localhost:1883"], ["broker kind"]),
    (["aggregator", "--strategy", "nope", "--ephemeral"], ["unknown strategy 'nope'"]),
    (["aggregator", "--broker", "localhost:1883"], ["must start with mqtt:// or mqtts://"]),
    (["aggregator", "--ephemeral", "--state-dir", "/tmp/x"], ["--ephemeral"]),
    (["aggregator", "--init-model", "/nonexistent.safetensors"], ["no such file"]),
    (["edge", "--agent-id", "bad/id"], ["agent id 'bad/id'"]),
    (["edge"], ["no agent id", "FEDMQTT_AGENT_ID"]),
    (["edge", "--agent-id", "a1", "--broker", "localhost:1883"], ["must start with mqtt://"]),
    (["edge", "--agent-id", "a1", "--compression", "gzip"], ["unknown compression 'gzip'", "topk:<fraction>"]),
    (["edge", "--agent-id", "a1", "--compression", "topk:200%"], ["topk needs a fraction in (0, 1]"]),
    (["edge", "--agent-id", "a1", "--model-download", "int4"], ["unknown model download 'int4'"]),
    (["aggregator", "--ephemeral", "--model-forms", "int8,bf16"], ["unknown model form 'bf16'"]),
    (["report", "/nonexistent-run"], ["no recorded run"]),
    (["aggregator", "--ephemeral", "--workers"], ["--workers", "--strategy fedbuff"]),
    (["worker", "--worker-id", "bad/id"], ["'bad/id'"]),
    (["worker", "--worker-id", "w1", "--buffer-size", "41"], ["--buffer-size"]),
    (["broker", "run", "--kind", "nope"], ["unknown broker kind"]),
])
def test_a_mistake_is_one_line_and_a_non_zero_exit(args: list[str], words: list[str]) -> None:
    assert_one_error_line(fedmqtt(*args), *words)


def test_a_task_without_its_data_is_one_line() -> None:
    done = fedmqtt("demo", "--task", "hapt", env={"FEDMQTT_HAPT": "/nonexistent/hapt.npz"})
    assert_one_error_line(done, "HAPT data not found", "FEDMQTT_HAPT")


def test_an_unreadable_or_wrong_config_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[aggregator]\nstrategy = \"fedbuff\"\nbuffer_sise = 3\n")
    assert_one_error_line(fedmqtt("aggregator", "--config", str(bad)), "no setting buffer_sise")
    bad.write_text("strategy = \n")
    assert_one_error_line(fedmqtt("aggregator", "--config", str(bad)), "not valid TOML")


@pytest.mark.broker
def test_a_busy_port_is_refused_by_broker_run() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        done = fedmqtt("broker", "run", "--port", str(s.getsockname()[1]))
    assert_one_error_line(done, "is taken")


@pytest.mark.broker
def test_a_wrong_broker_port_is_one_line() -> None:
    port = free_port()  # nothing listens there
    done = fedmqtt("demo", "--broker", f"mqtt://127.0.0.1:{port}", "--seconds", "2")
    assert_one_error_line(done, "cannot reach the broker", "Connection refused")


def test_arguments_are_checked_before_jax_is_imported() -> None:
    """The mistakes above are answered without loading JAX (which takes seconds on a small device)."""
    code = ("import sys\nfrom fedmqtt.cli import main\ntry:\n    main(['demo', '--strategy', 'x'])\n"
            "except SystemExit:\n    pass\nprint('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_version() -> None:
    done = fedmqtt("--version")
    assert done.returncode == 0 and done.stdout.startswith("fedmqtt ")


# ---- settings: file < environment < command line -------------------------------------------------------------
def settings(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert done.returncode == 0, done.stderr
    import tomllib

    return {k: str(v) for k, v in tomllib.loads(done.stdout).items()}


def test_settings_come_from_the_file_then_the_environment_then_the_command_line(tmp_path: Path) -> None:
    config = tmp_path / "fedmqtt.toml"
    config.write_text('[aggregator]\nstrategy = "fedbuff"\nbuffer-size = 4\nfederation = "plant-1"\n'
                      '[edge]\nlocal_steps = 7\n')
    base = ["aggregator", "--config", str(config), "--print-config"]
    s = settings(fedmqtt(*base))
    assert (s["strategy"], s["buffer-size"], s["federation"]) == ("fedbuff", "4", "plant-1")
    s = settings(fedmqtt(*base, env={"FEDMQTT_STRATEGY": "fedbuff-outlier", "FEDMQTT_BUFFER_SIZE": "6"}))
    assert (s["strategy"], s["buffer-size"]) == ("fedbuff-outlier", "6")
    s = settings(fedmqtt(*base, "--buffer-size", "8", env={"FEDMQTT_BUFFER_SIZE": "6"}))
    assert s["buffer-size"] == "8"
    s = settings(fedmqtt("edge", "--config", str(config), "--agent-id", "e1", "--print-config"))
    assert s["local-steps"] == "7"
    s = settings(fedmqtt("edge", "--print-config", env={"FEDMQTT_CONFIG": str(config), "FEDMQTT_AGENT_ID": "e2"}))
    assert (s["local-steps"], s["agent-id"]) == ("7", "e2")


# ---- the deployment files with an env file from `broker init` ------------------------------------------------
def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, # comments: what systemd's EnvironmentFile and docker's --env-file both read."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value
    return out


def systemd_command(unit: Path, env: dict[str, str]) -> list[str]:
    """ExecStart with ${VAR} and $VAR expanded from the environment file, as systemd does."""
    line = next(x for x in unit.read_text().splitlines() if x.startswith("ExecStart="))
    words = shlex.split(line.removeprefix("ExecStart="))
    for key, value in env.items():
        words = [w.replace("${" + key + "}", value).replace("$" + key, value) for w in words]
    assert not any("$" in w for w in words), words  # every variable it names is in the env file
    return words


def docker_command(dockerfile: Path) -> list[str]:
    line = next(x for x in dockerfile.read_text().splitlines() if x.startswith("ENTRYPOINT"))
    return list(json.loads(line.removeprefix("ENTRYPOINT")))


@pytest.mark.parametrize("how", ["systemd", "docker"])
def test_the_edge_unit_and_image_run_with_an_env_file_from_broker_init(tmp_path: Path, how: str) -> None:
    profile = init_broker(tmp_path / "profile", ["sensor-7f3a"], port=18883)
    env = env_file(profile.directory / "env" / "sensor-7f3a.env")
    if how == "systemd":
        words = systemd_command(REPO / "edge" / "fedmqtt-edge.service", env)
        assert Path(words[0]).name == "fedmqtt"
    else:
        words = docker_command(REPO / "edge" / "Dockerfile")
        assert words[0] == "fedmqtt"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQTT_")}
    done = subprocess.run([*FEDMQTT, *words[1:], "--print-config"], capture_output=True, text=True, timeout=60,
                          env={**clean, **env})
    s = settings(done)
    assert s["broker"] == env["FEDMQTT_BROKER_URL"] == profile.url("localhost")
    assert s["agent-id"] == "sensor-7f3a"
    assert s["model-key"] == env["FEDMQTT_MODEL_KEY"] and len(s["model-key"]) > 20
    assert s["outbox-dir"].startswith("/var/lib/fedmqtt")
    cfg = BrokerConfig.from_url(s["broker"], env=env)  # and the credentials the agent will connect with
    assert (cfg.username, cfg.tls, cfg.ca_file) == ("sensor-7f3a", True, str(profile.ca_file))


# ---- results to see and take away ----------------------------------------------------------------------------
@pytest.mark.broker
@pytest.mark.slow
def test_demo_saves_a_model_any_tool_reads_and_a_run_that_report_plots(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    model, run = tmp_path / "model.safetensors", tmp_path / "run"
    done = fedmqtt("demo", "--agents", "3", "--seconds", "4", "--save-model", str(model), "--record", str(run),
                   "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    tensors = load_file(model)  # the safetensors library alone
    assert set(tensors) == {"l1/bias", "l1/kernel", "l2/bias", "l2/kernel", "out/bias", "out/kernel"}
    assert all(np.isfinite(t).all() for t in tensors.values())
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("seconds,version") and len(rows) >= 3
    assert len((run / "agents.csv").read_text().splitlines()) == 1 + 3
    assert int(rows[-1].split(",")[1]) <= result["version"]
    report = fedmqtt("report", str(run))
    assert report.returncode == 0, report.stderr
    png = (run / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.broker
@pytest.mark.slow
def test_ctrl_c_during_the_demo_prints_a_partial_summary() -> None:
    proc = subprocess.Popen([*FEDMQTT, "demo", "--agents", "2", "--seconds", "120"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    try:
        for line in proc.stderr:  # the first progress line: the federation is running
            if line.startswith("[") and "version" in line:
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        code = proc.wait(60)
    finally:
        proc.kill()
    assert code == 130
    assert "interrupted after" in rest and "test accuracy" in rest and "Traceback" not in rest, rest


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


async def scraped(port: int, name: str, at_least: float) -> dict[str, float]:
    """The endpoint's series once ``name`` has reached ``at_least`` (60 s at most)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # not serving yet
            seen = await asyncio.to_thread(scrape, port)
            if seen.get(name, 0) >= at_least:
                return seen
        await asyncio.sleep(0.5)
    raise AssertionError(f"{name} never reached {at_least}")


@pytest.mark.broker
@pytest.mark.slow
async def test_the_prometheus_endpoint_shows_the_counters_moving(broker: BrokerConfig, federation: str) -> None:
    from fedmqtt.agent import AgentConfig, EdgeAgent
    from fedmqtt.tasks import get_task
    from fedmqtt.topics import Topics
    from fedmqtt.transport import mqtt_connector

    port = free_port()
    proc = subprocess.Popen([*FEDMQTT, "aggregator", "--broker", broker.url, "--federation", federation,
                             "--ephemeral", "--metrics-port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    task = get_task("digits", num_clients=2)
    cfg = AgentConfig(topics=Topics(federation=federation), local_steps=5, round_seconds=0.1)
    name = "fedmqtt_updates_accepted_total"
    try:
        async with EdgeAgent(mqtt_connector(broker), "p-0", task.trainer(0), task.data_for(0, 0), cfg):
            first = await scraped(port, name, 1)
            second = await scraped(port, name, first[name] + 5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert second["fedmqtt_version"] > first["fedmqtt_version"]
    assert second["fedmqtt_update_staleness_count"] == second[name]
    assert second["fedmqtt_update_handling_seconds_count"] >= second[name]


@pytest.mark.broker
@pytest.mark.slow
async def test_the_edge_prometheus_endpoint_counts_what_the_agent_sends(broker: BrokerConfig, federation: str) -> None:
    from fedmqtt.aggregator import Aggregator, AggregatorConfig
    from fedmqtt.strategies import fedasync
    from fedmqtt.tasks import get_task
    from fedmqtt.topics import Topics
    from fedmqtt.transport import mqtt_connector

    port = free_port()
    task = get_task("digits")
    agg = Aggregator(mqtt_connector(broker), task.trainer(0).initial, fedasync(),
                     AggregatorConfig(topics=Topics(federation=federation)))
    async with agg:
        proc = subprocess.Popen([*FEDMQTT, "edge", "--broker", broker.url, "--federation", federation,
                                 "--agent-id", "m-1", "--round-seconds", "0.1", "--metrics-port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            first = await scraped(port, "fedmqtt_edge_updates_sent_total", 1)
            second = await scraped(port, "fedmqtt_edge_updates_sent_total", first["fedmqtt_edge_updates_sent_total"] + 3)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert second['fedmqtt_edge_acks_total{outcome="accepted"}'] > first['fedmqtt_edge_acks_total{outcome="accepted"}']
    assert second["fedmqtt_edge_connected"] == 1 and second["fedmqtt_edge_model_version"] >= 1
    assert second['fedmqtt_edge_acks_total{outcome="accepted"}'] <= agg.state.counters.accepted


# ---- the broker and the watcher ------------------------------------------------------------------------------
@pytest.mark.broker
def test_broker_run_keeps_retained_messages_across_a_restart(tmp_path: Path) -> None:
    port = free_port()
    args = [*FEDMQTT, "broker", "run", "--port", str(port), "--data-dir", str(tmp_path / "data")]

    def session(publish: bool) -> str:
        import paho.mqtt.publish as publish_
        import paho.mqtt.subscribe as subscribe

        proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None and "listening" in proc.stderr.readline()
            if publish:
                publish_.single("fedmqtt/keep", "model-42", qos=1, retain=True, port=port)
            got = subscribe.simple("fedmqtt/keep", port=port).payload.decode()
        finally:
            proc.send_signal(signal.SIGTERM)  # what Ctrl-C or systemd does
            assert proc.wait(30) == 0
        return got

    assert session(publish=True) == "model-42"
    assert session(publish=False) == "model-42"  # saved on SIGTERM, loaded on start


@pytest.mark.broker
def test_watch_reconnects_when_the_broker_restarts(mosquitto: MosquittoProcess) -> None:
    import paho.mqtt.publish as publish

    proc = subprocess.Popen([*FEDMQTT, "watch", "--broker", f"mqtt://127.0.0.1:{mosquitto.port}",
                             "--federation", "w1"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    metrics = json.dumps({"schema": 1, "version": 7, "accepted": 7, "rejected": 1,
                          "rejected_by_reason": {"stale": 1}})
    try:
        assert "watching" in proc.stdout.readline()
        mosquitto.stop()
        asyncio.run(mosquitto.start())
        lines = []
        for _ in range(5):
            lines.append(proc.stdout.readline())
            if "watching" in lines[-1]:
                break
        assert "trying again" in "".join(lines) and "watching" in lines[-1], lines
        publish.single("fedmqtt/w1/metrics", metrics, qos=1, retain=True, port=mosquitto.port)
        line = proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert "version 7" in line and "stale 1" in line, line
