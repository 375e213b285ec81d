// Starts Swagger UI on the docs page (node/observe/docs_page.py). An asset, not an inline
// script, so that the page runs under a policy that allows scripts from this node only.
window.ui = SwaggerUIBundle({
  url: "/schema/openapi.json",
  dom_id: "#swagger-container",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
