"""What the command line accepts, checked before anything heavy is imported: a mistake is answered at once,
in one line, not after seconds of JAX start-up.

>>> check_choice("fedbuf", STRATEGIES, "strategy")
Traceback (most recent call last):
...
fedmqtt.errors.ConfigError: unknown strategy 'fedbuf' (did you mean fedbuff? choose one of fedasync, ...
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from fedmqtt.errors import ConfigError

# The names the strategy registry builds (a test keeps the two equal).
STRATEGIES = ("fedasync", "fedasync-polynomial", "fedasync-constant", "fedasync-hinge", "fedasync-guard", "fedbuff",
              "fedbuff-median", "fedbuff-trimmed", "fedbuff-norm", "fedbuff-krum", "fedbuff-outlier", "fedbuff-guard",
              "fedavg", "fedavg-delta")
PARTITIONS = ("iid", "dirichlet")
TASKS = ("digits", "digits-linear", "hapt", "hapt6", "hapt12")
BROKER_KINDS = ("auto", "mosquitto", "embedded")
HAPT_FILE = "hapt_har_30users.npz"


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value in choices:
        return value
    close = difflib.get_close_matches(value, choices, n=1)
    maybe = f"did you mean {close[0]}? " if close else ""
    listed = ", ".join(choices)
    raise ConfigError(f"unknown {what} {value!r} ({maybe}choose one of {listed})")


def _project_root() -> Path | None:
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def find_hapt(path: str | os.PathLike[str] | None = None) -> Path:
    """The HAPT file: ``path``, else ``$FEDMQTT_HAPT``, else ``<project root>/../shared/data/<file>``."""
    candidates: list[Path] = []
    if path is not None:
        candidates.append(Path(path))
    elif os.environ.get("FEDMQTT_HAPT"):
        candidates.append(Path(os.environ["FEDMQTT_HAPT"]))
    else:
        root = _project_root()
        if root is not None:
            candidates.append(root.parent / "shared" / "data" / HAPT_FILE)
        candidates.append(Path.cwd().parent / "shared" / "data" / HAPT_FILE)
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"HAPT data not found at {', '.join(map(str, candidates))} (set FEDMQTT_HAPT to the "
                      f"{HAPT_FILE} file; docs/benchmarks.md says where to get it)")


def check_task(task: str) -> str:
    """A known task whose data is at hand."""
    check_choice(task, TASKS, "task")
    if task.startswith("hapt"):
        find_hapt()
    return task


def parse_list(text: str) -> tuple[str, ...]:
    """``digits, hapt`` as ``('digits', 'hapt')`` (empty items dropped, repeats once).

    >>> parse_list("digits, hapt,,digits")
    ('digits', 'hapt')
    """
    return tuple(dict.fromkeys(i.strip() for i in text.split(",") if i.strip()))


def parse_tags(text: str) -> dict[str, str]:
    """``site=a,hw=pi4`` as a dict, by the protocol's rules for tags (docs/protocol.md 10.1); ConfigError for
    a tag that breaks them.

    >>> parse_tags("site=plant-3, hw=rpi4")
    {'site': 'plant-3', 'hw': 'rpi4'}
    """
    out: dict[str, str] = {}
    for item in parse_list(text):
        key, eq, value = (p.strip() for p in item.partition("="))
        if not eq or not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", key) or len(value) > 64 or not value.isprintable():
            raise ConfigError(f"--tags: {item!r} is not key=value (key: 1-64 of A-Z a-z 0-9 . _ : -; value: at most "
                              "64 printable characters)")
        out[key] = value
    if len(out) > 16:
        raise ConfigError("--tags: at most 16 tags")
    return out
