"""Joining a cluster: a refused connection names the likely cause when it is token authentication
(Ray 2.60 logs ``InvalidAuthToken`` but raises only "Failed to connect"; seen with a token-auth head)."""

import pytest
import ray

from actors import runtime


def _refused(**_):
    raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:6379")


def test_a_refused_join_names_token_authentication_unless_it_is_on(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", _refused)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(ConnectionError, match=r"192.0.2.2:6379; .*token authentication.*RAY_AUTH_MODE=token"):
        runtime.connect("192.0.2.2:6379")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # already on: Ray's own error, unchanged
    with pytest.raises(ConnectionError, match=r"^Failed to connect to Ray cluster at 192.0.2.2:6379$"):
        runtime.connect("192.0.2.2:6379")
