"""Triton's health and model-repository API, through tritonclient's HTTP client.

`TritonAdmin` answers liveness and readiness (False when nothing answers), lists the repository index
and loads models, turning Triton's refusals into ServerError with Triton's own reason.
`model_problems` says why requested models are not READY.
"""
from __future__ import annotations

import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from polarprune.serving.errors import ServerError

# Everything a request to a server that is not (yet) there can raise: refused, reset, timed out.
UNREACHABLE = (OSError, InferenceServerException, TimeoutError)


class TritonAdmin:
    """One HTTP connection to a server's admin endpoints (host:port, no scheme). Not thread-safe."""

    def __init__(self, http_url: str, timeout_s: float = 2.0):
        self.http_url = http_url
        self._client = httpclient.InferenceServerClient(http_url, connection_timeout=timeout_s,
                                                        network_timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "TritonAdmin":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _answers(self, call) -> bool:
        try:
            return bool(call())
        except UNREACHABLE:
            return False

    def is_live(self) -> bool:
        return self._answers(self._client.is_server_live)

    def is_ready(self) -> bool:
        return self._answers(self._client.is_server_ready)

    def is_model_ready(self, model: str) -> bool:
        return self._answers(lambda: self._client.is_model_ready(model))

    def server_version(self) -> str | None:
        """The Triton version the server reports in its metadata; None when it does not answer."""
        try:
            return str(self._client.get_server_metadata().get("version")) or None
        except UNREACHABLE:
            return None

    def index(self) -> list[dict]:
        """The repository index: one entry per model version (name, version, state, reason)."""
        try:
            return self._client.get_model_repository_index() or []
        except InferenceServerException as error:
            raise ServerError(f"repository index unavailable at {self.http_url} ({error.message()})") from None
        except UNREACHABLE as error:
            raise ServerError(f"repository index unavailable at {self.http_url} (nothing answers: "
                              f"{type(error).__name__})") from None

    def ready_versions(self, model: str) -> list[str]:
        """Versions of `model` the server has READY, ascending."""
        return sorted((entry["version"] for entry in self.index()
                       if entry["name"] == model and entry.get("state") == "READY"
                       and str(entry.get("version")).isdigit()), key=int)

    def load(self, model: str) -> None:
        """Ask the server (explicit model control) to (re)load `model`; ServerError with Triton's reason."""
        try:
            self._client.load_model(model)
        except InferenceServerException as error:
            raise ServerError((error.message() or "no reason given").strip()) from None
        except UNREACHABLE as error:
            raise ServerError(f"no answer ({type(error).__name__})") from None

    def unload(self, model: str) -> None:
        """Ask the server (explicit model control) to unload `model`; ServerError with Triton's reason."""
        try:
            self._client.unload_model(model)
        except InferenceServerException as error:
            raise ServerError((error.message() or "no reason given").strip()) from None
        except UNREACHABLE as error:
            raise ServerError(f"no answer ({type(error).__name__})") from None

    def version_policy(self, model: str) -> dict:
        """The model's version_policy; Triton's default (the latest one version) when it sets none."""
        try:
            config = self._client.get_model_config(model) or {}
        except UNREACHABLE:
            config = {}
        return config.get("version_policy") or {"latest": {"num_versions": 1}}


def model_problems(admin: TritonAdmin, models: tuple[str, ...]) -> dict[str, str]:
    """Triton's reason for every requested model that is not READY (empty when all are)."""
    try:
        index = admin.index()
    except ServerError as unavailable:
        return {model: str(unavailable) for model in models}
    state = {}
    for entry in index:
        if entry.get("state") == "READY" or entry["name"] not in state:
            state[entry["name"]] = entry
    problems = {}
    for model in models:
        entry = state.get(model)
        if entry is None:
            problems[model] = "not in the server's model repository"
        elif entry.get("state") != "READY":
            problems[model] = f"{entry.get('state', 'UNKNOWN')}: {entry.get('reason', '').strip()}"
        else:
            continue
        if entry is None or not entry.get("reason", "").strip():
            # The index keeps no reason for a config that does not parse or a model without versions;
            # one explicit load attempt returns it (a server in another control mode refuses: keep ours).
            try:
                admin.load(model)
            except ServerError as refused:
                if not str(refused).startswith("no answer"):
                    problems[model] = f"{problems[model].rstrip(': ')}: {refused}"
    return problems
