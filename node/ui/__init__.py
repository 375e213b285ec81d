"""The dashboard at `/ui`: server-rendered pages (Jinja2) over the admin API, with the
assets they need shipped in the package (`static/`, uPlot vendored): no CDN."""
