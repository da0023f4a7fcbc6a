"""SQL statements, one per file, named after the operation they perform.

Files refer to the schema as ``{prefix}``. Prefixes are restricted to plain
lower-case identifiers, so substituting them needs no quoting.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

PREFIX_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` when it is a valid schema name, else raise ValueError."""
    if not isinstance(prefix, str) or not PREFIX_PATTERN.fullmatch(prefix):
        raise ValueError(
            f"invalid prefix {prefix!r}: use a lower-case schema name of at most 63 letters, "
            "digits and underscores that starts with a letter or underscore, as in 'public'"
        )

    return prefix


@cache
def _read(name: str) -> str:
    return files(__name__).joinpath(f"{name}.sql").read_text(encoding="utf-8")


@cache
def load(name: str, prefix: str) -> str:
    """Return the statement in ``<name>.sql`` with ``prefix`` substituted."""
    return _read(name).replace("{prefix}", check_prefix(prefix))
