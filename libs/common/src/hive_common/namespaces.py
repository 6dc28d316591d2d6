"""The registry's worker namespaces: the rule every service checks a namespace against
(the registry for what workers register and what is discovered, the orchestrator for the
namespace it is configured to search)."""

from __future__ import annotations

import re

DEFAULT_NAMESPACE = "default"
NAMESPACE_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
NAMESPACE_RULE = "must be a DNS label: 1-63 lowercase letters, digits or '-'"

__all__ = ["DEFAULT_NAMESPACE", "NAMESPACE_RE", "NAMESPACE_RULE"]
