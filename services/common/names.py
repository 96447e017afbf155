"""Name rules that more than one service checks: what the registry and builder register under
(models, datasets, environments) and what an endpoint may be called. One definition, so that a
name one service accepts is never refused by the next."""

from __future__ import annotations

import re

REGISTERED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Models, datasets and environments: letters, digits, '.', '_' and '-', at most 128."""

ENDPOINT_NAME = re.compile(r"[a-z][a-z0-9-]{0,39}")
"""Endpoints (and the deployments in them): 1-40 lowercase letters, digits and '-', starting with a letter."""
