"""Test-wide settings: git must never prompt or read the developer's configuration."""

import os

os.environ.update(
    GIT_TERMINAL_PROMPT="0",
    GIT_CONFIG_NOSYSTEM="1",
    GIT_CONFIG_GLOBAL=os.devnull,
    GIT_AUTHOR_NAME="Test",
    GIT_AUTHOR_EMAIL="test@example.com",
    GIT_COMMITTER_NAME="Test",
    GIT_COMMITTER_EMAIL="test@example.com",
)
os.environ.pop("GIT_ASKPASS", None)
os.environ.pop("SSH_ASKPASS", None)
