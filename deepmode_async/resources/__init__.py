"""The API's endpoints, grouped as the client exposes them: `models`, `images`, `account`."""

from __future__ import annotations

from ._base import Resource
from .account import Account
from .images import Images
from .models import Models

__all__ = ["Account", "Images", "Models", "Resource"]
