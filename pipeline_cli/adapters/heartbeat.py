"""Heartbeat pings (healthchecks.io style): ``[notify] ping_url`` on success, ``<url>/fail`` on
failure, so a dead-man's switch notices both failing runs and runs that stopped happening.

A ping is best effort: a short timeout, one attempt, and a failed ping is logged (without the
URL, which is a secret: it alone lets anyone ping the check) and never fails the stage.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("pipeline.heartbeat")

# Healthchecks keeps the first 100 kB of a ping body as the event log; a summary is enough.
MAX_BODY = 10_000


def ping_url(base: str, stage: str, *, fail: bool) -> str:
    """``base`` with ``{stage}`` filled in, and ``/fail`` appended to the path on failure.

    ``https://hc-ping.com/<key>/{stage}`` gives one check per stage (healthchecks slug URLs);
    without the placeholder every stage pings the same check.
    """
    url = base.replace("{stage}", stage)
    if not fail:
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/fail"))


class Heartbeat:
    """Pings one healthchecks-style URL; a no-op when ``url`` is None."""

    def __init__(self, url: str | None, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def success(self, stage: str, summary: str = "") -> bool:
        return self._ping(stage, summary, fail=False)

    def failure(self, stage: str, summary: str = "") -> bool:
        return self._ping(stage, summary, fail=True)

    def _ping(self, stage: str, summary: str, *, fail: bool) -> bool:
        """True when the ping was delivered (2xx); never raises."""
        if not self.url:
            return False
        import requests  # only when a heartbeat is configured: keeps cron start-up light

        what = "failure" if fail else "success"
        try:
            with requests.Session() as session:
                resp = session.post(ping_url(self.url, stage, fail=fail),
                                    data=summary[:MAX_BODY].encode("utf-8", "replace"),
                                    timeout=self.timeout, allow_redirects=True,
                                    headers={"Content-Type": "text/plain; charset=utf-8"})
                status = resp.status_code
                resp.close()
        except requests.RequestException as exc:
            # The exception text holds the URL: log its class only.
            log.warning("heartbeat %s ping for %s not delivered: %s", what, stage,
                        type(exc).__name__, extra={"stage": stage})
            return False
        if not 200 <= status < 300:
            log.warning("heartbeat %s ping for %s answered HTTP %s", what, stage, status,
                        extra={"stage": stage})
            return False
        log.debug("heartbeat %s ping for %s delivered", what, stage, extra={"stage": stage})
        return True
