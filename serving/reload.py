"""Pick up a model version exported while the server runs (explicit model control).

Triton loads the new version next to the old one, switches unversioned requests to it once it is ready,
and unloads the old one after its in-flight requests finish; a version that fails to load leaves the old
one serving.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from polarprune.serving.admin import TritonAdmin
from polarprune.serving.errors import ServerError


@dataclass(frozen=True)
class ReloadResult:
    model: str
    versions_before: tuple[str, ...]    # READY before the load call
    versions_after: tuple[str, ...]     # READY once the new version serves and the old ones are gone
    served_version: str                 # what an unversioned request now gets (the highest READY)
    seconds: float


def reload_model(http_url: str, model: str, version: str | None = None,
                 timeout_s: float = 120.0) -> ReloadResult:
    """Ask the server to re-read `model` from its repository and wait until the new version serves:
    `version` when given, else the highest one the server has READY afterwards.

    Triton's load call returns once the new version is ready; the old one is unloaded after its
    in-flight requests finish, so we also wait for it to leave the READY list (bounded by `timeout_s`).
    The version policy decides how many versions stay READY: export's configs name the one they serve
    (`specific`), Triton's default keeps the latest one; another `latest` count keeps that many.
    ServerError carries Triton's reason when the load fails (the previously loaded version then keeps
    serving).
    """
    start = time.monotonic()
    with TritonAdmin(http_url, timeout_s=timeout_s) as admin:
        before = tuple(admin.ready_versions(model))
        try:
            admin.load(model)
        except ServerError as refused:
            still = f"; still serving version(s) {list(before)}" if before else ""
            raise ServerError(f"reload of {model!r} failed: {refused}{still}") from None
        policy = admin.version_policy(model)
        if "specific" in policy:
            keep = len(policy["specific"].get("versions", [])) or None
        else:
            keep = int(policy["latest"].get("num_versions", 1)) if "latest" in policy else None
        deadline = start + timeout_s
        while True:
            after = admin.ready_versions(model)
            target = str(version) if version is not None else (after[-1] if after else None)
            served = bool(after) and after[-1] == target
            if (served and (keep is None or len(after) <= keep)) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    if not served:
        raise ServerError(f"{model!r} version {target} not serving {timeout_s:.0f} s after the reload "
                          f"(READY: {after})")
    return ReloadResult(model, before, tuple(after), after[-1], time.monotonic() - start)
