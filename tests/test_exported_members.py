"""The public API is exported on purpose: every name in __all__ exists, and nothing public is unlisted."""

import types

import fedmqtt


def test_all_names_exist() -> None:
    missing = [name for name in fedmqtt.__all__ if not hasattr(fedmqtt, name)]
    assert missing == []


def test_no_unlisted_public_members() -> None:
    public = {
        name for name, value in vars(fedmqtt).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(fedmqtt.__all__)
