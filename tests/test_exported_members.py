"""The public API is exported on purpose: every name in __all__ exists, and nothing public is unlisted."""

import subprocess
import sys
import types

import fedmqtt


def test_all_names_exist() -> None:
    missing = [name for name in fedmqtt.__all__ if not hasattr(fedmqtt, name)]
    assert missing == []


def test_no_unlisted_public_members() -> None:
    for name in fedmqtt.__all__:
        getattr(fedmqtt, name)  # imported on first use
    public = {
        name for name, value in vars(fedmqtt).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
        and name not in ("annotations", "importlib", "TYPE_CHECKING", "Any")
    }
    assert public == set(fedmqtt.__all__)


def test_the_package_and_the_command_line_import_without_jax() -> None:
    """``fedmqtt --help`` and argument errors answer at once: JAX is imported only when a command runs."""
    code = "import sys, fedmqtt, fedmqtt.cli; print('jax' in sys.modules, 'flax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
