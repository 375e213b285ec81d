"""Everything the dashboard serves, for the app to register: its pages, sign-in and out, and
its static assets (from the package, so that it works offline)."""

from __future__ import annotations

from pathlib import Path

from litestar.datastructures import CacheControlHeader
from litestar.static_files import create_static_files_router

from node.ui.pages import PAGE_ROUTES
from node.ui.signin import SIGN_IN_ROUTES

STATIC_DIRECTORY = Path(__file__).parent / "static"

STATIC_ROUTER = create_static_files_router(
    path="/ui/static",
    directories=[STATIC_DIRECTORY],
    name="ui-static",
    include_in_schema=False,
    # Short: a new version of the node may ship new assets under the same names.
    cache_control=CacheControlHeader(max_age=300, private=True),
)

UI_ROUTES = [*PAGE_ROUTES, *SIGN_IN_ROUTES, STATIC_ROUTER]
