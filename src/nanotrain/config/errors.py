"""What a config problem is: ConfigError, and failed(), which every rule reports through.

A check returns its messages instead of raising, so validate() can report every problem at once
(config/rules.py); each message names the key and the fix.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem: the message names the key and the fix."""


def failed(rules: list[tuple[bool, str]]) -> list[str]:
    """The messages of the rules that do not hold: each check lists (holds, message) pairs."""
    return [msg for ok, msg in rules if not ok]
