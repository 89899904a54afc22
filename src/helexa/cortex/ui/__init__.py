"""The dashboard's one page (``GET /ui``): plain HTML and JavaScript shipped in the package,
no build step and nothing fetched from elsewhere, so it works offline. It polls
``/admin/dashboard`` with the key the operator types (kept in the browser's session
storage) and posts the admin actions with it."""

from importlib.resources import files

DASHBOARD_HTML = (files(__package__) / "dashboard.html").read_bytes()
