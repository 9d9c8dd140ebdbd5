"""One check for every hostile-input test: the answer, and what the attack cost the server.

A hostile request must be refused *and* must lose nothing: the server stays
up, its memory and its data directory do not grow by what the attacker sent,
and a bystander's clone still works meanwhile. ``Attack`` records the
server's footprint before, and :meth:`Attack.check` asserts all of it after.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from .conftest import Server, git

MiB = 1 << 20


@attrs.define
class Attack:
    """The server's footprint before an attack, and the check after it.

    *bystander_url* is a repository another (honest) client clones after the
    attack; it must succeed and pass ``git fsck``.
    """

    server: Server
    bystander_url: str
    rss_before: int = 0
    disk_before: int = 0

    def __attrs_post_init__(self) -> None:
        self.rss_before = self.server.rss_bytes()
        self.disk_before = self.server.disk_bytes()

    def check(
        self, tmp: Path, *, max_rss_growth: int = 64 * MiB, max_disk_growth: int = 8 * MiB
    ) -> None:
        """Server alive, footprint bounded, the bystander's clone whole."""
        assert self.server.alive(), "the server died under the attack"
        grew = self.server.rss_bytes() - self.rss_before
        assert grew <= max_rss_growth, f"server memory grew by {grew / MiB:.1f} MiB"
        disk = self.server.disk_bytes() - self.disk_before
        assert disk <= max_disk_growth, f"data directory grew by {disk / MiB:.1f} MiB"
        dst = tmp / "bystander"
        n = 0
        while dst.exists():
            n += 1
            dst = tmp / f"bystander-{n}"
        git("clone", "-q", self.bystander_url, str(dst))
        git("fsck", "--strict", cwd=dst)
